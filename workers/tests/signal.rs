//! `waybill signal` over NATS, through the coordinator: a signal reaches
//! the order waiting for it, which runs its step with the signal's JSON; a
//! second one is a duplicate; a misspelt signal, bad JSON, an unknown order
//! and an order that ended are clear errors; `waybill status` shows what
//! the order awaits and the signal in its history.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::{Arc, Mutex};
use std::time::Duration;

use waybill::coordinator::{self, CoordinatorClient, CoordinatorConfig};
use waybill::transport::nats::Nats;
use waybill::coordinator::api::OrdersQuery;
use waybill::transport::{Headers, HopLog, LogReader, NatsConfig, Transport};
use waybill::headers;
use waybill::{Client, OrderId, Payload, Status, StepContext, StepOutput, Worker, Workflow};
use waybill_testkit::NatsServer;

mod common;
use common::{text, waybill};

const DEADLINE: Duration = Duration::from_secs(20);

/// Waits for the first hop of `id` whose headers `pred` accepts, read from
/// the stream (from its start, then live), then for the coordinator to
/// have read it too (read-your-writes: `OrdersQuery::after`). No polling:
/// the log delivers each hop as it is stored.
async fn hop_seen(nats: &Nats, asks: &CoordinatorClient<Nats>, id: &OrderId, pred: impl Fn(&Headers) -> bool) {
    let mut log = nats.read_log(1).await.unwrap();
    let want = id.to_string();
    let find = async {
        loop {
            for m in log.next_batch(64).await.unwrap() {
                let h = &m.message.headers;
                let ours = h
                    .get(headers::HOP)
                    .and_then(headers::HopHeader::parse)
                    .is_some_and(|hop| hop.order == want);
                if ours && pred(h) {
                    return m.sequence;
                }
            }
        }
    };
    let seq = tokio::time::timeout(DEADLINE, find).await.expect("the hop was never stored");
    let query = OrdersQuery {
        after: Some(seq),
        ..OrdersQuery::default()
    };
    asks.orders(&query).await.unwrap();
}

/// A throwaway server, a coordinator (no workflow definitions: it tracks
/// any) and a client.
struct Stack {
    server: NatsServer,
    url: String,
    nats: Nats,
    coordinator: waybill::coordinator::CoordinatorHandle<Nats>,
    client: Client<Nats>,
}

impl Stack {
    async fn start() -> Self {
        let server = NatsServer::start();
        let url = server.url();
        let nats = Nats::connect(&url, NatsConfig::default()).await.unwrap();
        let coordinator = coordinator::start(nats.clone(), None, CoordinatorConfig::default())
            .await
            .unwrap();
        let client = Client::connect(nats.clone()).await.unwrap();
        Self {
            server,
            url,
            nats,
            coordinator,
            client,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_from_the_command_line_reaches_the_order_waiting_for_it() {
    let Stack {
        server: _server,
        url,
        nats,
        coordinator,
        client,
    } = Stack::start().await;
    let wf = Workflow::builder("approval", 1)
        .step("hold", "t.hold")
        .step("book", "t.book")
        .await_signal("approved", Duration::from_secs(3600))
        .build()
        .unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let book = {
        let seen = seen.clone();
        move |ctx: StepContext, _p: Payload| {
            seen.lock().unwrap().extend(ctx.signal("approved").map(str::to_owned));
            async { Ok(StepOutput::ok()) }
        }
    };
    let worker = Worker::builder(nats.clone())
        .serve("t.hold", |_c: StepContext, _p: Payload| async { Ok(StepOutput::ok()) })
        .serve("t.book", book)
        .start()
        .await
        .unwrap();
    let id = client
        .start(&wf, Payload::json(&serde_json::json!({"trip": 1})).unwrap())
        .await
        .unwrap();
    let sid = id.to_string();

    // The coordinator says when the order awaits its signal.
    let asks = CoordinatorClient::new(nats.clone(), Duration::from_secs(5));
    hop_seen(&nats, &asks, &id, |h| h.get(headers::AWAITS) == Some("approved")).await;
    assert!(asks.status(&id).await.unwrap().awaiting.is_some());
    let status = text(&waybill(&url, &["status", &sid]).stdout);
    assert!(status.contains("awaiting  signal approved since"), "{status}");

    // Mistakes are errors, and change nothing.
    let fails = |args: &[&str], want: &str| {
        let out = waybill(&url, args);
        assert!(!out.status.success(), "{args:?} succeeded: {}", text(&out.stdout));
        assert!(text(&out.stderr).contains(want), "{args:?}: {}", text(&out.stderr));
    };
    fails(
        &["signal", &sid, "aproved"],
        "waits for no signal `aproved`; its route waits for: approved",
    );
    fails(&["signal", &sid, "approved", "{not json"], "is not JSON");
    fails(&["signal", &OrderId::new().to_string(), "approved"], "unknown order");
    fails(&["signal", &sid, "bad name!"], "signal name `bad name!`");
    assert!(seen.lock().unwrap().is_empty());

    let out = waybill(&url, &["signal", &sid, "approved", r#"{"by": "ana"}"#]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("its step book runs now"),
        "{}",
        text(&out.stdout)
    );
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    assert_eq!(*seen.lock().unwrap(), [r#"{"by":"ana"}"#]);

    // Once ended, no signal reaches it; the history shows the one that did.
    fails(&["signal", &sid, "approved"], "already ended completed");
    let done = |h: &Headers| {
        h.get(headers::HOP)
            .and_then(headers::HopHeader::parse)
            .is_some_and(|hop| hop.status == "completed")
    };
    hop_seen(&nats, &asks, &id, done).await;
    let out = waybill(&url, &["status", &sid, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "completed", "{v}");
    let history = v["history"].as_array().unwrap();
    assert!(
        history
            .iter()
            .any(|h| h["signal"]["name"] == "approved" && h["signal"]["data"] == r#"{"by":"ana"}"#),
        "{v}"
    );
    assert!(v.get("awaiting").is_none(), "{v}");

    worker.shutdown().await;
    client.close().await;
    coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_kept_before_the_step_and_sent_again_is_a_duplicate() {
    let Stack {
        server: _server,
        url,
        nats,
        coordinator,
        client,
    } = Stack::start().await;
    let wf = Workflow::builder("approval", 1)
        .step("hold", "t.hold")
        .delay(Duration::from_secs(3600))
        .step("book", "t.book")
        .await_signal("approved", Duration::from_secs(3600))
        .build()
        .unwrap();
    // No worker serves the hold: the order sleeps before it, far from the
    // step that waits for the signal.
    let id = client
        .start(&wf, Payload::json(&serde_json::json!({})).unwrap())
        .await
        .unwrap();
    let sid = id.to_string();
    let asks = CoordinatorClient::new(nats.clone(), Duration::from_secs(5));
    hop_seen(&nats, &asks, &id, |_| true).await;
    let out = waybill(&url, &["signal", &sid, "approved", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["duplicate"].as_bool(), v["awaited"].as_bool()),
        (Some(false), Some(false)),
        "{v}"
    );
    let out = waybill(&url, &["signal", &sid, "approved", r#"{"again": true}"#]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("duplicate:"), "{}", text(&out.stdout));
    // Kept, with the first one's JSON.
    let kept = nats.signal(&id, &"approved".parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(kept.data, "{}");
    client.close().await;
    coordinator.shutdown().await;
}
