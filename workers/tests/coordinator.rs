//! The coordinator against a real nats-server: its view agrees with what
//! every order really did, survives a SIGKILL, splits orders between
//! partitions, reports stalled orders and re-drives lost hops, and answers
//! bad requests with errors while it keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use waybill::coordinator::api::{OrdersQuery, OrdersReply, StallAction, StalledEvent, StartReply, StatusReply};
use waybill::coordinator::{self, CoordinatorConfig, CoordinatorHandle, Partition};
use waybill::transport::nats::{Nats, HOPS_STREAM};
use waybill::transport::{ConsumerConfig, NatsConfig, Transport};
use waybill::{Client, Document, OrderId, Payload, Status, StepOutput, Worker, WorkerHandle, Workflow};
use waybill_testkit::{workspace_root, NatsServer, Proc};
use waybill_workers::replay;
use waybill_workers::services::MemoryServices;

const MIXED: &str = "examples/orders/mixed.jsonl";

/// The transport on a connection the test opens, and that connection, for
/// what the test does with NATS directly (requests, subscriptions, stream
/// settings). One connection, as before: a subscription made on it is in
/// place before anything the transport publishes after.
async fn connect(url: &str) -> (Nats, async_nats::Client) {
    let raw = async_nats::connect(url).await.unwrap();
    let nats = Nats::with_client(raw.clone(), NatsConfig::default()).unwrap();
    nats.setup().await.unwrap();
    (nats, raw)
}

async fn workers(nats: &Nats) -> WorkerHandle {
    let stock = replay::load_stock(&workspace_root().join("examples/stock.json")).unwrap();
    MemoryServices::new(stock)
        .serve(Worker::builder(nats.clone()).concurrency(256))
        .start()
        .await
        .unwrap()
}

fn registry() -> Arc<waybill::Registry> {
    Arc::new(waybill_workflows::registry().unwrap())
}

async fn coordinator(nats: &Nats, config: CoordinatorConfig) -> CoordinatorHandle<Nats> {
    coordinator::start(nats.clone(), Some(registry()), config)
        .await
        .unwrap()
}

async fn last_sequence(raw: &async_nats::Client) -> u64 {
    let js = async_nats::jetstream::new(raw.clone());
    let mut s = js.get_stream(HOPS_STREAM).await.unwrap();
    s.info().await.unwrap().state.last_sequence
}

/// Starts the first `n` orders of the mixed flows and waits for each end;
/// returns every order's final document.
async fn run_mixed(client: &Client<Nats>, n: usize) -> Vec<Arc<Document>> {
    let flows = replay::load(&workspace_root().join(MIXED), &registry()).unwrap();
    let orders: Vec<_> = flows.orders.into_iter().take(n).collect();
    futures::stream::iter(orders)
        .map(|o| {
            let client = client.clone();
            async move {
                let id = client.start(&o.workflow, o.payload).await.unwrap();
                let doc = tokio::time::timeout(Duration::from_secs(60), client.wait(id))
                    .await
                    .expect("an order did not finish within 60 s")
                    .unwrap();
                assert_eq!(doc.status, o.expect, "order {id} (line {})", o.line);
                doc
            }
        })
        .buffer_unordered(256)
        .collect()
        .await
}

async fn ask<T: serde::de::DeserializeOwned>(client: &async_nats::Client, subject: String, body: Bytes) -> T {
    let m = tokio::time::timeout(Duration::from_secs(10), client.request(subject.clone(), body))
        .await
        .unwrap_or_else(|_| panic!("no answer on {subject}"))
        .unwrap();
    serde_json::from_slice(&m.payload)
        .unwrap_or_else(|e| panic!("answer on {subject}: {e}: {}", String::from_utf8_lossy(&m.payload)))
}

async fn error_of(client: &async_nats::Client, subject: &str, body: impl Into<Bytes>) -> String {
    let v: serde_json::Value = ask(client, subject.to_owned(), body.into()).await;
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error on {subject}, got {v}"))
        .to_owned()
}

async fn status_of(client: &async_nats::Client, id: OrderId) -> StatusReply {
    ask(client, format!("waybill.status.{id}"), Bytes::new()).await
}

async fn orders_after(client: &async_nats::Client, seq: u64, query: OrdersQuery) -> OrdersReply {
    let q = OrdersQuery {
        after: Some(seq),
        ..query
    };
    ask(
        client,
        "waybill.orders".into(),
        Bytes::from(serde_json::to_vec(&q).unwrap()),
    )
    .await
}

/// Every order's status, as the coordinators answer it, agrees with its
/// final document: status, hop, and the whole history.
async fn assert_view_matches(client: &async_nats::Client, docs: &[Arc<Document>]) {
    for d in docs {
        let s = status_of(client, d.id).await;
        assert_eq!(s.status, d.status, "order {}", d.id);
        assert_eq!(s.hop, d.hop, "order {}", d.id);
        assert_eq!(s.workflow, d.route.workflow);
        assert_eq!(s.history.len(), d.history.len(), "order {}", d.id);
        for (h, r) in s.history.iter().zip(&d.history) {
            assert_eq!((&h.step, h.attempt, h.kind), (&r.step, r.attempt, r.kind));
        }
        assert!(!s.stalled && s.due.is_none());
    }
}

fn tally(docs: &[Arc<Document>]) -> BTreeMap<Status, u64> {
    let mut t = BTreeMap::new();
    for d in docs {
        *t.entry(d.status).or_insert(0) += 1;
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_after_a_mixed_replay_matches_every_order_and_a_rebuild_equals_it() {
    let server = NatsServer::start();
    let (nats, raw) = connect(&server.url()).await;
    let live = coordinator(&nats, CoordinatorConfig::default()).await;
    let worker = workers(&nats).await;
    let client = Client::connect(nats.clone()).await.unwrap();
    let docs = run_mixed(&client, 2000).await;
    let last = last_sequence(&raw).await;
    assert!(live.reached(last, Duration::from_secs(30)).await);

    assert_view_matches(&raw, &docs).await;
    let reply = orders_after(&raw, last, OrdersQuery::default()).await;
    let s = &reply.summary;
    assert_eq!((s.tracked, s.in_flight, s.stalled), (2000, 0, 0));
    assert_eq!(s.by_status, tally(&docs));
    assert_eq!(s.finished, tally(&docs));
    assert!(reply.feeds[0].caught_up && reply.feeds[0].undecodable == 0);

    // A coordinator started now rebuilds the same view from the stream.
    let rebuilt = coordinator(&nats, CoordinatorConfig::default()).await;
    assert!(rebuilt.reached(last, Duration::from_secs(30)).await);
    rebuilt.caught_up().await;
    assert_eq!(rebuilt.snapshot(), live.snapshot());
    assert_eq!(rebuilt.feed_stats().replayed_hops, last);

    rebuilt.shutdown().await;
    live.shutdown().await;
    worker.shutdown().await;
    client.close().await;
}

fn coordinator_process(url: &str, extra: &[&str]) -> Proc {
    let mut c = Command::new(env!("CARGO_BIN_EXE_waybill"));
    c.args(["coordinator", "--nats", url])
        .args(extra)
        .current_dir(workspace_root())
        .env("RUST_LOG", "warn");
    Proc::spawn("waybill coordinator", c)
}

fn waybill(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_waybill"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_replay_comes_back_to_the_same_view() {
    let server = NatsServer::start();
    let url = server.url();
    let (nats, raw) = connect(&url).await;
    let mut first = coordinator_process(&url, &[]);
    first.expect_stderr("replayed 0 hops", Duration::from_secs(30));
    let worker = workers(&nats).await;
    let client = Client::connect(nats.clone()).await.unwrap();

    // Kill the coordinator (SIGKILL) once the replay is well under way.
    let mut hops = raw.subscribe("waybill.hop.>").await.unwrap();
    let replay = tokio::spawn({
        let client = client.clone();
        async move { run_mixed(&client, 2000).await }
    });
    for _ in 0..1500 {
        tokio::time::timeout(Duration::from_secs(60), hops.next())
            .await
            .unwrap();
    }
    first.kill9();
    let mut second = coordinator_process(&url, &[]);
    second.expect_stderr("coordinator 0/1: replayed", Duration::from_secs(30));

    let docs = replay.await.unwrap();
    let last = last_sequence(&raw).await;
    let reply = orders_after(&raw, last, OrdersQuery::default()).await;
    assert_eq!(reply.summary.tracked, 2000);
    assert_eq!(reply.summary.by_status, tally(&docs));
    assert_view_matches(&raw, &docs).await;

    // The command line reads the same view.
    let id = docs[0].id.to_string();
    let out = waybill(&["status", &id, "--nats", &url, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: StatusReply = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s.status, docs[0].status);
    let out = waybill(&["status", &id, "--nats", &url]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&id) && table.contains("charge"), "{table}");
    let out = waybill(&["orders", "--status", "completed", "--nats", &url, "--json"]);
    let r: OrdersReply = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(Some(&r.summary.matched), tally(&docs).get(&Status::Completed));
    let out = waybill(&["status", "not-an-id", "--nats", &url]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-an-id"));

    // `waybill start` prints one id per order, through the coordinator.
    let mut done = raw.subscribe("waybill.done.>").await.unwrap();
    let out = waybill(&["start", "order", "examples/orders/happy.jsonl", "--nats", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ids: Vec<OrderId> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let happy = std::fs::read_to_string(workspace_root().join("examples/orders/happy.jsonl")).unwrap();
    assert_eq!(ids.len(), happy.lines().count());
    let mut waiting: HashSet<OrderId> = ids.into_iter().collect();
    let codec = waybill::Codec::default();
    while !waiting.is_empty() {
        let m = tokio::time::timeout(Duration::from_secs(30), done.next())
            .await
            .expect("the started orders did not all finish within 30 s")
            .unwrap();
        let ct = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Content-Type"))
            .map(|v| v.as_str());
        let doc = codec.decode_as(&m.payload, ct).unwrap();
        if waiting.remove(&doc.id) {
            assert_eq!(doc.status, Status::Completed);
        }
    }

    // `waybill watch` draws until Ctrl-C, then exits cleanly. A plain
    // subscription sees its first summary request go by.
    let mut requests = raw.subscribe("waybill.orders").await.unwrap();
    let watch = {
        let mut c = Command::new(env!("CARGO_BIN_EXE_waybill"));
        c.args(["watch", "--nats", &url, "--every-ms", "100"])
            .current_dir(workspace_root());
        Proc::spawn("waybill watch", c)
    };
    tokio::time::timeout(Duration::from_secs(20), requests.next())
        .await
        .unwrap();
    let (status, stderr) = watch.signal_and_wait("INT", Duration::from_secs(10));
    assert!(status.success(), "watch exited with {status}: {stderr}");

    let (status, stderr) = second.signal_and_wait("TERM", Duration::from_secs(10));
    assert!(status.success(), "{stderr}");
    worker.shutdown().await;
    client.close().await;
}

/// A one-step workflow whose step times out fast, so it stalls fast.
fn quick(name: &str) -> Workflow {
    Workflow::builder(name, 1)
        .step("only", format!("{name}.step"))
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
}

fn quick_config() -> CoordinatorConfig {
    CoordinatorConfig {
        stall_grace: Duration::ZERO,
        check_every: Duration::from_millis(100),
        ..CoordinatorConfig::default()
    }
}

/// Waits, with a deadline, for a coordinator to announce a stalled order
/// that `check` accepts.
async fn stalled_event(
    events: &mut async_nats::Subscriber,
    what: &str,
    check: impl Fn(&StalledEvent) -> bool,
) -> StalledEvent {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let m = events.next().await.unwrap();
            let e: StalledEvent = serde_json::from_slice(&m.payload).unwrap();
            if check(&e) {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not announced within 20 s"))
}

fn counting_worker(nats: &Nats, service: &str, runs: Arc<AtomicU32>) -> waybill::WorkerBuilder<Nats> {
    Worker::builder(nats.clone()).serve(service, move |_ctx, _p: Payload| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(StepOutput::ok())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_order_is_reported_and_completes_once_a_worker_runs() {
    let server = NatsServer::start();
    let (nats, raw) = connect(&server.url()).await;
    let coord = coordinator(&nats, quick_config()).await;
    let client = Client::connect(nats.clone()).await.unwrap();
    let wf = quick("stall");
    let mut events = raw.subscribe("waybill.stalled.>").await.unwrap();
    let id = client.start(&wf, Payload::postcard(&1u8).unwrap()).await.unwrap();

    // No worker serves `stall.step`: the order is announced, logged, and
    // listed as stalled.
    let e = stalled_event(&mut events, "the order stalls", |e| e.id == id).await;
    assert_eq!(e.action, StallAction::Reported);
    assert!(
        e.reason.contains("no worker has ever served `stall.step`"),
        "{}",
        e.reason
    );
    let q = OrdersQuery {
        stalled: true,
        ..OrdersQuery::default()
    };
    let r: OrdersReply = ask(
        &raw,
        "waybill.orders".into(),
        Bytes::from(serde_json::to_vec(&q).unwrap()),
    )
    .await;
    assert_eq!(
        (r.summary.stalled, r.summary.matched, r.summary.ids.clone()),
        (1, 1, vec![id])
    );
    let s = status_of(&raw, id).await;
    assert!(s.stalled && s.status == Status::Running && s.service.unwrap().as_str() == "stall.step");
    let cli = waybill(&["orders", "--stalled", "--nats", &server.url()]);
    assert!(String::from_utf8_lossy(&cli.stdout).contains(&id.to_string()));

    // A worker starts: the hop waiting in the stream reaches it.
    let runs = Arc::new(AtomicU32::new(0));
    let worker = counting_worker(&nats, "stall.step", runs.clone())
        .start()
        .await
        .unwrap();
    let doc = tokio::time::timeout(Duration::from_secs(30), client.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.status, Status::Completed);
    let last = last_sequence(&raw).await;
    assert!(coord.reached(last, Duration::from_secs(10)).await);
    let s = status_of(&raw, id).await;
    assert!(!s.stalled && s.status == Status::Completed);
    assert_eq!(coord.orders(&OrdersQuery::default()).summary.stalled, 0);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(coord.feed_stats().redriven, 0, "a waiting hop is not re-driven");

    worker.shutdown().await;
    coord.shutdown().await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_its_consumer_passed_without_a_next_hop_is_re_driven_once() {
    let server = NatsServer::start();
    let (nats, raw) = connect(&server.url()).await;
    let coord = coordinator(&nats, quick_config()).await;
    let client = Client::connect(nats.clone()).await.unwrap();
    let wf = quick("lost");
    let mut events = raw.subscribe("waybill.stalled.>").await.unwrap();

    // Something takes the hop off the service's consumer and acknowledges it
    // without publishing a next hop: the order would wait forever.
    let take_and_drop = || async {
        let durable = waybill::subject::service_consumer(&"lost.step".parse().unwrap());
        let mut rogue = nats
            .consumer(ConsumerConfig::new(durable, "waybill.hop.lost.step"))
            .await
            .unwrap();
        let taken = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let batch = waybill::transport::Consumer::fetch(&mut rogue, 1).await.unwrap();
                if let Some(d) = batch.into_iter().next() {
                    return d;
                }
            }
        })
        .await
        .unwrap();
        waybill::transport::Delivery::ack(taken).await.unwrap();
    };
    let id = client.start(&wf, Payload::postcard(&1u8).unwrap()).await.unwrap();
    take_and_drop().await;

    // The coordinator finds it stalled, sees the consumer past it, and
    // republishes it.
    stalled_event(&mut events, "the lost hop is re-driven", |e| {
        e.id == id && e.action == StallAction::Redriven
    })
    .await;

    // Lost again: a re-driven hop is not republished a second time (a hop a
    // worker keeps refusing would otherwise loop), only reported.
    take_and_drop().await;
    let e = stalled_event(&mut events, "the second loss is reported", |e| e.id == id && e.hop == 0).await;
    assert_eq!(e.action, StallAction::Reported);
    assert!(e.reason.contains("re-driven once already"), "{}", e.reason);
    assert_eq!(coord.feed_stats().redrive_refused, 1);
    assert_eq!(coord.feed_stats().redriven, 1);
    assert_eq!(coord.get(&id).unwrap().status, Status::Running);

    // Another order, lost once: re-driven, then done by a worker, once.
    let second = client.start(&wf, Payload::postcard(&2u8).unwrap()).await.unwrap();
    take_and_drop().await;
    stalled_event(&mut events, "the second order is re-driven", |e| {
        e.id == second && e.action == StallAction::Redriven
    })
    .await;
    let runs = Arc::new(AtomicU32::new(0));
    let worker = counting_worker(&nats, "lost.step", runs.clone()).start().await.unwrap();
    let doc = tokio::time::timeout(Duration::from_secs(30), client.wait(second))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.status, Status::Completed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let last = last_sequence(&raw).await;
    assert!(coord.reached(last, Duration::from_secs(10)).await);
    assert_eq!(coord.feed_stats().redriven, 2);
    assert_eq!(coord.get(&second).unwrap().status, Status::Completed);

    worker.shutdown().await;
    coord.shutdown().await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_split_the_orders_and_either_answers_for_all() {
    let server = NatsServer::start();
    let (nats, raw) = connect(&server.url()).await;
    let half = |i| CoordinatorConfig {
        partition: Partition::new(i, 2).unwrap(),
        ..CoordinatorConfig::default()
    };
    let a = coordinator(&nats, half(0)).await;
    let b = coordinator(&nats, half(1)).await;
    let worker = workers(&nats).await;
    let client = Client::connect(nats.clone()).await.unwrap();
    let docs = run_mixed(&client, 600).await;
    let last = last_sequence(&raw).await;
    assert!(a.reached(last, Duration::from_secs(30)).await && b.reached(last, Duration::from_secs(30)).await);

    // Each order is tracked by exactly one of them.
    let ids_a: HashSet<OrderId> = a.snapshot().iter().map(|s| s.id).collect();
    let ids_b: HashSet<OrderId> = b.snapshot().iter().map(|s| s.id).collect();
    let all: HashSet<OrderId> = docs.iter().map(|d| d.id).collect();
    assert!(ids_a.is_disjoint(&ids_b));
    assert_eq!(ids_a.union(&ids_b).copied().collect::<HashSet<_>>(), all);
    assert!(
        ids_a.len() > 200 && ids_b.len() > 200,
        "{} / {}",
        ids_a.len(),
        ids_b.len()
    );

    // Either answers any status (forwarding to the owner) and the merged
    // summary counts both halves.
    assert_view_matches(&raw, &docs).await;
    let r = orders_after(&raw, last, OrdersQuery::default()).await;
    assert_eq!(
        (r.summary.tracked, r.answered.clone(), r.missing.clone()),
        (600, vec![0, 1], vec![])
    );
    assert_eq!(r.summary.by_status, tally(&docs));

    // Without partition 1, its orders say so, and the summary names it.
    b.shutdown().await;
    let in_b = *ids_b.iter().next().unwrap();
    let e = error_of(&raw, &format!("waybill.status.{in_b}"), Bytes::new()).await;
    assert!(e.contains("no coordinator runs partition 1/2"), "{e}");
    let r: OrdersReply = ask(&raw, "waybill.orders".into(), Bytes::new()).await;
    assert_eq!((r.answered.clone(), r.missing.clone()), (vec![0], vec![1]));
    assert_eq!(r.summary.tracked, ids_a.len() as u64);

    a.shutdown().await;
    worker.shutdown().await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_the_coordinator_keeps_serving() {
    let server = NatsServer::start();
    let (nats, raw) = connect(&server.url()).await;
    let coord = coordinator(&nats, CoordinatorConfig::default()).await;
    let c = &raw;
    let good = r#"{"customer":"c-1","items":[{"sku":"SKU-1","qty":1,"unit_price_cents":100}],
        "payment":{"card":"4242424242424242"},"ship_to":{"country":"NL","zip":"1011"}}"#;

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("waybill.start.nosuch", good.into(), "unknown workflow `nosuch`"),
        ("waybill.start.order", b"not json".to_vec(), "invalid order payload"),
        ("waybill.start.order", b"".to_vec(), "invalid order payload"),
        ("waybill.start.order", br#"{"customer":"c-1"}"#.to_vec(), "missing field"),
        (
            "waybill.start.order",
            good.replace(r#""qty":1"#, r#""qty":"one""#).into_bytes(),
            "invalid type",
        ),
        ("waybill.start.order", good.replace(r#""qty":1"#, r#""qty":-3"#).into_bytes(), "qty"),
        (
            "waybill.start.order",
            br#"{"customer":"c-1","items":[],"payment":{"card":"4242424242424242"},"ship_to":{"country":"NL","zip":"1"}}"#
                .to_vec(),
            "at least one item",
        ),
        ("waybill.start.order", vec![b' '; 300 * 1024], "over the limit"),
        ("waybill.status.not-a-uuid", Vec::new(), "not-a-uuid"),
        ("waybill.orders", b"{".to_vec(), "bad orders request"),
        ("waybill.orders", br#"{"colour":"red"}"#.to_vec(), "unknown field"),
        ("waybill.orders", br#"{"status":"lost"}"#.to_vec(), "unknown variant"),
    ];
    for (subject, body, want) in cases {
        let v: serde_json::Value = ask(c, subject.to_owned(), body.into()).await;
        let e = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("expected an error on {subject}, got {v}"));
        assert!(e.contains(want), "{subject}: expected `{want}` in `{e}`");
        // A start refused for cause says that trying again will not help;
        // other requests' errors carry no such field.
        if subject.starts_with("waybill.start.") {
            assert_eq!(v["retryable"], false, "{subject}: {v}");
        } else {
            assert!(v.get("retryable").is_none(), "{subject}: {v}");
        }
        assert!(v.get("id").is_none(), "{subject}: {v}");
    }
    let e = error_of(c, &format!("waybill.status.{}", OrderId::new()), Bytes::new()).await;
    assert!(e.starts_with("unknown order"), "{e}");
    // A bad id header.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Waybill-Order", "nope");
    let m = c
        .send_request(
            "waybill.start.order",
            async_nats::Request::new().headers(h).payload(good.into()),
        )
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");
    assert_eq!(v["retryable"], false, "{v}");
    // Nothing was started by any of it.
    assert_eq!(last_sequence(&raw).await, 0);

    // Still serving: a good start, and a repeated start of the same id
    // stores nothing new.
    let id = OrderId::new();
    let start_with_id = |id: OrderId| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Waybill-Order", id.to_string().as_str());
        async_nats::Request::new().headers(h).payload(Bytes::from(good))
    };
    let m = c.send_request("waybill.start.order", start_with_id(id)).await.unwrap();
    let first: StartReply = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!((first.id, first.duplicate), (id, false));
    let m = c.send_request("waybill.start.order", start_with_id(id)).await.unwrap();
    let again: StartReply = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!((again.id, again.duplicate), (id, true));
    assert_eq!(last_sequence(&raw).await, 1);
    let r = orders_after(c, 1, OrdersQuery::default()).await;
    assert_eq!(r.summary.ids, vec![id]);
    let s = status_of(c, id).await;
    assert_eq!((s.status, s.step.as_str(), s.hop), (Status::Running, "charge", 0));
    coord.shutdown().await;
}

/// A start request for an order of the `order` workflow, with or without a
/// chosen id; the answer as JSON.
async fn start_request(c: &async_nats::Client, body: &'static str, id: Option<OrderId>) -> serde_json::Value {
    let mut req = async_nats::Request::new().payload(Bytes::from(body));
    if let Some(id) = id {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Waybill-Order", id.to_string().as_str());
        req = req.headers(h);
    }
    let m = tokio::time::timeout(Duration::from_secs(10), c.send_request("waybill.start.order", req))
        .await
        .expect("no answer to a start within 10 s")
        .unwrap();
    serde_json::from_slice(&m.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_cannot_be_stored_answers_retryable_with_its_id_and_its_retry_stores_it_once() {
    const GOOD: &str = r#"{"customer":"c-1","items":[{"sku":"SKU-1","qty":1,"unit_price_cents":100}],
        "payment":{"card":"4242424242424242"},"ship_to":{"country":"NL","zip":"1011"}}"#;
    let server = NatsServer::start();
    // The test's connection (the transport on it sets the streams up).
    let (_, raw) = connect(&server.url()).await;
    // The coordinator on a connection of its own.
    let (own, _) = connect(&server.url()).await;
    let coord = coordinator(
        &own,
        CoordinatorConfig {
            start_timeout: Duration::from_secs(2),
            ..CoordinatorConfig::default()
        },
    )
    .await;
    let c = &raw;
    // No stream stores hops any more (as none answers for them while a
    // replicated stream elects its leader): the stream keeps only the
    // terminal subjects.
    let js = async_nats::jetstream::new(raw.clone());
    let full = js.get_stream(HOPS_STREAM).await.unwrap().cached_info().config.clone();
    let no_hops = async_nats::jetstream::stream::Config {
        subjects: vec!["waybill.done.>".into()],
        ..full.clone()
    };
    js.update_stream(no_hops).await.unwrap();

    // With a chosen id: tried for the coordinator's 2 s, then answered
    // retryable, naming the id.
    let chosen = OrderId::new();
    let v = start_request(c, GOOD, Some(chosen)).await;
    assert_eq!(v["retryable"], true, "{v}");
    assert_eq!(v["id"], chosen.to_string(), "{v}");
    assert!(v["error"].as_str().unwrap().contains("could not be stored"), "{v}");
    // Without one: the id the coordinator chose, to retry with.
    let v = start_request(c, GOOD, None).await;
    assert_eq!(v["retryable"], true, "{v}");
    let theirs: OrderId = v["id"].as_str().unwrap().parse().unwrap();
    // A refusal for cause is answered at once, outage or not.
    let v = start_request(c, r#"{"customer":"c-1"}"#, Some(OrderId::new())).await;
    assert_eq!(v["retryable"], false, "{v}");
    assert!(v.get("id").is_none(), "{v}");

    // The stream back while a start is being tried: the coordinator's own
    // retries store it. The stream comes back after the second failed try,
    // which the coordinator reports as a warning naming the order (a
    // subscriber here, to see the tries, would answer them and change them).
    let mut tries = start_tries();
    let third = OrderId::new();
    let pending = tokio::spawn({
        let c = c.clone();
        async move { start_request(&c, GOOD, Some(third)).await }
    });
    let key = third.to_string();
    tokio::time::timeout(
        Duration::from_secs(10),
        tries.wait_for(|failed| failed.get(&key).is_some_and(|&n| n >= 2)),
    )
    .await
    .expect("the coordinator did not try to store the start twice within 10 s")
    .unwrap();
    assert!(!pending.is_finished(), "answered before the stream came back");
    js.update_stream(full).await.unwrap();
    let r: StartReply = serde_json::from_value(pending.await.unwrap()).unwrap();
    assert_eq!((r.id, r.duplicate), (third, false));

    // The two answered retryable, retried under their ids: stored once.
    for id in [chosen, theirs] {
        let first: StartReply = serde_json::from_value(start_request(c, GOOD, Some(id)).await).unwrap();
        assert_eq!((first.id, first.duplicate), (id, false));
        let again: StartReply = serde_json::from_value(start_request(c, GOOD, Some(id)).await).unwrap();
        assert_eq!((again.id, again.duplicate), (id, true));
    }
    assert_eq!(last_sequence(&raw).await, 3);
    coord.shutdown().await;
}

#[test]
fn every_partition_is_reachable_by_hashing_the_id_the_documented_way() {
    // The formula in Partition::of, written out again as a client in
    // another language would: SplitMix64's finaliser over the id's low
    // 64 bits (big-endian), modulo the count.
    let mut seen: HashMap<u32, u32> = HashMap::new();
    for _ in 0..1000 {
        let id = OrderId::new();
        let b = id.as_uuid().as_bytes();
        let mut z = u64::from_be_bytes(b[8..].try_into().unwrap());
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^= z >> 31;
        let p = (z % 4) as u32;
        assert_eq!(Partition::of(&id, 4), p);
        *seen.entry(p).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 4);
}

/// The failed tries to store each start, by order id, as the engine's
/// warnings report them (`order`, `tries`): a layer on the process's
/// subscriber, installed once, that the tests of this binary share.
fn start_tries() -> tokio::sync::watch::Receiver<HashMap<String, u64>> {
    use std::sync::OnceLock;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;

    struct Tries(tokio::sync::watch::Sender<HashMap<String, u64>>);

    #[derive(Default)]
    struct Fields {
        order: Option<String>,
        tries: Option<u64>,
    }

    impl tracing::field::Visit for Fields {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "order" {
                self.order = Some(format!("{value:?}"));
            }
        }
        fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
            if field.name() == "tries" {
                self.tries = Some(value);
            }
        }
    }

    impl<S: tracing::Subscriber> Layer<S> for Tries {
        fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            let mut f = Fields::default();
            event.record(&mut f);
            if let (Some(order), Some(tries)) = (f.order, f.tries) {
                self.0.send_modify(|m| {
                    m.insert(order, tries);
                });
            }
        }
    }

    static TRIES: OnceLock<tokio::sync::watch::Sender<HashMap<String, u64>>> = OnceLock::new();
    TRIES
        .get_or_init(|| {
            let (tx, _) = tokio::sync::watch::channel(HashMap::new());
            let only_warnings = tracing_subscriber::filter::filter_fn(|m| {
                m.target() == "waybill::client" && *m.level() == tracing::Level::WARN
            });
            let layer = Tries(tx.clone()).with_filter(only_warnings);
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("no other subscriber in this test binary");
            tx
        })
        .subscribe()
}
