//! `waybill cancel` over NATS: an order cancelled while its step runs stops
//! at its next hop, its completed step is undone, and it ends `cancelled`;
//! an order that ended cannot be cancelled.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use waybill::coordinator::{self, CoordinatorConfig};
use waybill::transport::nats::Nats;
use waybill::transport::{HopLog, NatsConfig};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_cancel_says_how_many_then_cancels_them_and_the_subject_takes_one() {
    let server = NatsServer::start();
    let url = server.url();
    let nats = Nats::connect(&url, NatsConfig::default()).await.unwrap();
    nats.setup().await.unwrap();
    let registry = Arc::new(waybill_workflows::registry().unwrap());
    let coordinator = coordinator::start(nats.clone(), Some(registry.clone()), CoordinatorConfig::default())
        .await
        .unwrap();
    let client = Client::connect(nats.clone()).await.unwrap();

    // Every charge waits at a gate the test opens.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(tokio::sync::Semaphore::new(0));
    let charge = {
        let (gate, entered) = (gate.clone(), entered.clone());
        move |_ctx: StepContext, _p: Payload| {
            let (gate, entered) = (gate.clone(), entered.clone());
            async move {
                entered.add_permits(1);
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

    const N: u32 = 5;
    let mut ids = Vec::new();
    for s in samples::of_kind(Kind::Happy, N as usize, 7) {
        let (wf, p) = registry.prepare(waybill_workflows::ORDER, &s.order).unwrap();
        ids.push(client.start(&wf, p).await.unwrap());
    }
    // All of them in their charge, so the coordinator has them at it.
    let all_in = tokio::time::timeout(DEADLINE, entered.acquire_many(N))
        .await
        .unwrap()
        .unwrap();
    all_in.forget();
    let last = nats.log_info().await.unwrap().last_sequence;
    assert!(coordinator.reached(last, DEADLINE).await);

    // A dry run says how many and changes nothing.
    let dry = waybill(&url, &["cancel", "--where", "status=running,step=charge"]);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(
        text(&dry.stdout).contains(&format!("{N} orders in flight match")),
        "{}",
        text(&dry.stdout)
    );
    // (That it cancelled none shows below: every cancel after it is new.)
    let bad = waybill(&url, &["cancel", "--where", "status=completed"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("can be cancelled while running"),
        "{}",
        text(&bad.stderr)
    );

    // One order through the public subject, as any NATS client sends it.
    let reply = waybill::transport::Rpc::request(
        &nats,
        waybill::subject::cancel(&ids[0]),
        waybill::transport::Headers::new(),
        bytes::Bytes::from_static(br#"{"reason": "by subject"}"#),
        DEADLINE,
    )
    .await
    .unwrap();
    let reply: waybill::coordinator::api::CancelReply = serde_json::from_slice(&reply).unwrap();
    assert_eq!(
        (reply.id, reply.already_asked, reply.step.as_str()),
        (ids[0], false, "charge")
    );

    // The rest in bulk: the one cancelled already is counted as such.
    let out = waybill(&url, &["cancel", "--where", "step=charge", "--yes", "--reason", "bulk"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("{} cancels asked, 1 asked already, 0 refused", N - 1)),
        "{}",
        text(&out.stdout)
    );
    for id in &ids {
        assert!(
            nats.cancel_seen(id, DEADLINE).await,
            "the worker never saw the cancel of {id}"
        );
    }
    gate.add_permits(N as usize);
    for id in &ids {
        let doc = tokio::time::timeout(DEADLINE, client.wait(*id)).await.unwrap().unwrap();
        assert_eq!(doc.status, Status::Cancelled, "{:?}", doc.failure);
    }
    let n: Vec<usize> = calls.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert_eq!(n, [N as usize, 0, 0, 0], "each charge refunded once; nothing else ran");

    // An unknown order is a clear error on the subject too.
    let unknown = waybill(&url, &["cancel", &waybill::OrderId::new().to_string()]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("unknown order"),
        "{}",
        text(&unknown.stderr)
    );

    worker.shutdown().await;
    client.close().await;
    coordinator.shutdown().await;
}
