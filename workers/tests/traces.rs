//! Traces across hosts: the spans of one order's steps, exported by the
//! workers that ran them, share one trace whose id is the order id, and
//! chain hop to hop (each step's parent is the step that published its hop).
//!
//! In one process, two workers on the embedded transport, each on its own
//! thread with its own subscriber and tracer provider (as two processes
//! would be), export to in-memory exporters. Across processes, the real
//! worker binaries export over OTLP/HTTP to a small collector this test
//! runs, and are stopped with SIGTERM: their spans reach it only because
//! they flush after draining (the batch timer is set far beyond the test).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use prost::Message;
use tracing_subscriber::layer::SubscriberExt;
use waybill::transport::nats::{Nats, NatsConfig};
use waybill::transport::Embedded;
use waybill::{Client, Document, OrderId, Status, StepKind, Worker, WorkerBuilder};
use waybill_testkit::{workspace_root, NatsServer, Proc};
use waybill_workers::otel;
use waybill_workers::services::{
    serve_inventory, serve_payment, serve_shipping, InventoryService, MemoryLedger, MemoryShipments, MemoryStock,
    PaymentService, ShippingService,
};
use waybill_workflows::samples::{self, Kind};

const DEADLINE: Duration = Duration::from_secs(30);

/// The orders every test runs: one that completes, one that retries its
/// charge twice, and one that cannot ship and is undone (its trace goes
/// payment → inventory → shipping → inventory → payment).
fn orders() -> Vec<(Kind, waybill_workflows::Order)> {
    [Kind::Happy, Kind::Transient, Kind::Unshippable]
        .into_iter()
        .map(|k| (k, samples::of_kind(k, 1, 7).remove(0).order))
        .collect()
}

/// One exported span, wherever it was exported from.
#[derive(Debug, Clone)]
struct Seen {
    service: String,
    trace_id: u128,
    span_id: u64,
    /// 0 for none.
    parent_span_id: u64,
    name: String,
    consumer: bool,
}

/// What a span's name says the step is: `charge`, `reserve (compensation)`.
fn span_name(doc_step: &str, kind: StepKind) -> String {
    match kind {
        StepKind::Forward => doc_step.to_owned(),
        StepKind::Compensation => format!("{doc_step} (compensation)"),
    }
}

/// The checks of one order's trace against its final document: one span
/// per hop whose step ran (span id hop + 1, named after the history's
/// record of it), all in the trace whose id is the order id, each the
/// child of the one before, exported by the worker that serves the step's
/// service. Returns the services that exported its spans.
fn check_trace(doc: &Document, spans: &[Seen], service_of: impl Fn(&str) -> String) -> Vec<String> {
    let trace = doc.id.as_uuid().as_u128();
    let mut mine: Vec<&Seen> = spans.iter().filter(|s| s.trace_id == trace).collect();
    mine.sort_by_key(|s| s.span_id);
    let want: Vec<(u64, u64, String, String)> = doc
        .history
        .iter()
        .enumerate()
        .map(|(hop, r)| {
            let span = hop as u64 + 1;
            (
                span,
                span - 1,
                span_name(r.step.as_str(), r.kind),
                service_of(r.service.as_str()),
            )
        })
        .collect();
    let got: Vec<(u64, u64, String, String)> = mine
        .iter()
        .map(|s| (s.span_id, s.parent_span_id, s.name.clone(), s.service.clone()))
        .collect();
    assert_eq!(
        got, want,
        "order {} ({}): its spans (span id, parent, name, service) against its history",
        doc.id, doc.status
    );
    assert!(
        mine.iter().all(|s| s.consumer),
        "every step span is a consumer's: {mine:?}"
    );
    let mut services: Vec<String> = mine.iter().map(|s| s.service.clone()).collect();
    services.sort();
    services.dedup();
    services
}

// ---- in one process, on the embedded transport ----

/// A worker on its own thread and runtime, with its own subscriber and
/// tracer provider named `service`, exporting to memory.
struct TracedWorker {
    service: &'static str,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Vec<SpanData>>>,
}

impl TracedWorker {
    fn start(
        service: &'static str,
        transport: Embedded,
        serve: impl FnOnce(WorkerBuilder<Embedded>) -> WorkerBuilder<Embedded> + Send + 'static,
    ) -> Self {
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let exporter = InMemorySpanExporter::default();
            let provider = otel::tracer_provider(service, exporter.clone());
            let subscriber = tracing_subscriber::registry().with(otel::layer(&provider));
            let _default = tracing::subscriber::set_default(subscriber);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let worker = serve(Worker::builder(transport)).start().await.unwrap();
                ready_tx.send(()).unwrap();
                let _ = stopped.await;
                worker.shutdown().await;
            });
            // Drained: what is still queued goes out now.
            provider.force_flush().unwrap();
            exporter.get_finished_spans().unwrap()
        });
        ready.recv_timeout(DEADLINE).unwrap();
        Self {
            service,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Drains the worker and returns the spans it exported.
    fn stop(mut self) -> Vec<Seen> {
        let _ = self.stop.take().unwrap().send(());
        let spans = self.thread.take().unwrap().join().unwrap();
        spans
            .into_iter()
            .map(|s| Seen {
                service: self.service.to_owned(),
                trace_id: u128::from_be_bytes(s.span_context.trace_id().to_bytes()),
                span_id: u64::from_be_bytes(s.span_context.span_id().to_bytes()),
                parent_span_id: u64::from_be_bytes(s.parent_span_id.to_bytes()),
                name: s.name.into_owned(),
                consumer: s.span_kind == SpanKind::Consumer,
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_in_one_process_export_each_order_as_one_chained_trace() {
    let transport = Embedded::new();
    let payment = TracedWorker::start("payment-worker", transport.clone(), |b| {
        serve_payment(&Arc::new(PaymentService::new(MemoryLedger::default())), b)
    });
    let goods = TracedWorker::start("goods-worker", transport.clone(), |b| {
        let b = serve_inventory(&Arc::new(InventoryService::new(MemoryStock::new(HashMap::new()))), b);
        serve_shipping(&Arc::new(ShippingService::new(MemoryShipments::default())), b)
    });
    let registry = waybill_workflows::registry().unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let mut docs = Vec::new();
    for (kind, order) in orders() {
        let (wf, p) = registry.prepare(waybill_workflows::ORDER, &order).unwrap();
        let id = client.start(&wf, p).await.unwrap();
        let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
        docs.push((kind, doc));
    }
    let mut spans = tokio::task::spawn_blocking(move || payment.stop()).await.unwrap();
    spans.extend(tokio::task::spawn_blocking(move || goods.stop()).await.unwrap());

    let service_of = |s: &str| {
        if s.starts_with("payment.") {
            "payment-worker".to_owned()
        } else {
            "goods-worker".to_owned()
        }
    };
    for (kind, doc) in &docs {
        let want = match kind {
            Kind::Unshippable => Status::Compensated,
            _ => Status::Completed,
        };
        assert_eq!(doc.status, want, "{kind:?}: {:?}", doc.failure);
        let services = check_trace(doc, &spans, service_of);
        assert_eq!(services, ["goods-worker", "payment-worker"], "{kind:?}");
    }
    // Nothing else was exported: no span outside a step (the fetch loops'),
    // none twice.
    let steps: usize = docs.iter().map(|(_, d)| d.history.len()).sum();
    assert_eq!(spans.len(), steps, "{spans:#?}");
    // The transient order's charge was tried three times, on three hops.
    let transient = &docs[1].1;
    let charges = transient.history.iter().filter(|r| r.step.as_str() == "charge").count();
    assert_eq!(charges, 3, "{:?}", transient.history);
}

// ---- across processes, over NATS and OTLP/HTTP ----

/// A collector that takes OTLP/HTTP protobuf posts on `/v1/traces`.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Seen>>>,
    /// The number of spans received so far.
    count: tokio::sync::watch::Receiver<usize>,
    /// Content types of the posts, as sent.
    content_types: Arc<Mutex<Vec<String>>>,
}

#[derive(Clone)]
struct CollectorState {
    spans: Arc<Mutex<Vec<Seen>>>,
    count: Arc<tokio::sync::watch::Sender<usize>>,
    content_types: Arc<Mutex<Vec<String>>>,
}

fn hex_u128(b: &[u8]) -> u128 {
    u128::from_be_bytes(b.try_into().unwrap_or([0; 16]))
}

fn hex_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap_or([0; 8]))
}

async fn receive(
    axum::extract::State(state): axum::extract::State<CollectorState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, [(&'static str, &'static str); 1], Vec<u8>) {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    state.content_types.lock().unwrap().push(content_type);
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            [("content-type", "text/plain")],
            b"not an ExportTraceServiceRequest".to_vec(),
        );
    };
    let mut added = Vec::new();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            added.push(Seen {
                service: service.clone(),
                trace_id: hex_u128(&span.trace_id),
                span_id: hex_u64(&span.span_id),
                parent_span_id: hex_u64(&span.parent_span_id),
                name: span.name,
                consumer: span.kind == opentelemetry_proto::tonic::trace::v1::span::SpanKind::Consumer as i32,
            });
        }
    }
    let total = {
        let mut spans = state.spans.lock().unwrap();
        spans.extend(added);
        spans.len()
    };
    state.count.send_replace(total);
    (
        axum::http::StatusCode::OK,
        [("content-type", "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

impl Collector {
    async fn start() -> Self {
        let (count_tx, count) = tokio::sync::watch::channel(0);
        let state = CollectorState {
            spans: Arc::default(),
            count: Arc::new(count_tx),
            content_types: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            spans: state.spans,
            count,
            content_types: state.content_types,
        }
    }

    fn spans(&self) -> Vec<Seen> {
        self.spans.lock().unwrap().clone()
    }
}

/// A worker binary against `nats`, exporting to `otlp`, with nothing of the
/// test's own environment deciding where or how.
fn worker(bin: &str, name: &'static str, nats: &str, otlp: &str) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.args(["--nats", nats, "--otlp-endpoint", otlp, "--threads", "1"])
        .current_dir(workspace_root())
        .env("RUST_LOG", "warn")
        // No export on the batch timer within the test: the spans arrive
        // only through the flush after the drain.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000");
    for var in [
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
    ] {
        cmd.env_remove(var);
    }
    Proc::spawn(name, cmd)
}

fn workers(nats: &str, otlp: &str) -> Vec<Proc> {
    vec![
        worker(env!("CARGO_BIN_EXE_payment-worker"), "payment-worker", nats, otlp),
        worker(env!("CARGO_BIN_EXE_inventory-worker"), "inventory-worker", nats, otlp),
        worker(env!("CARGO_BIN_EXE_shipping-worker"), "shipping-worker", nats, otlp),
    ]
}

fn setup(url: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_waybill"))
        .args(["setup", "--nats", url, "--stock", "examples/stock.json"])
        .current_dir(workspace_root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Runs the orders to their end over NATS; returns their final documents.
async fn run_orders(url: &str) -> Vec<(Kind, Arc<Document>)> {
    let nats = Nats::connect(url, NatsConfig::default()).await.unwrap();
    let client = Client::connect(nats).await.unwrap();
    let registry = waybill_workflows::registry().unwrap();
    let mut ids: Vec<(Kind, OrderId)> = Vec::new();
    for (kind, order) in orders() {
        let (wf, p) = registry.prepare(waybill_workflows::ORDER, &order).unwrap();
        ids.push((kind, client.start(&wf, p).await.unwrap()));
    }
    let mut docs = Vec::new();
    for (kind, id) in ids {
        let doc = tokio::time::timeout(DEADLINE, client.wait(id))
            .await
            .unwrap_or_else(|_| panic!("{kind:?} order {id} did not end within {DEADLINE:?}"))
            .unwrap();
        docs.push((kind, doc));
    }
    docs
}

/// SIGTERM, and each worker must drain and exit 0; returns their standard
/// error.
async fn stop_all(procs: Vec<Proc>) -> BTreeMap<String, String> {
    tokio::task::spawn_blocking(move || {
        procs
            .into_iter()
            .map(|p| {
                let name = p.name.clone();
                let (status, stderr) = p.signal_and_wait("TERM", Duration::from_secs(20));
                assert!(status.success(), "{name} exited with {status}: {stderr}");
                assert!(stderr.contains("drained after"), "{name}: {stderr}");
                (name, stderr)
            })
            .collect()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_export_each_order_as_one_trace_across_services() {
    let collector = Collector::start().await;
    let server = NatsServer::start();
    let url = server.url();
    setup(&url);
    let procs = workers(&url, &format!("http://{}", collector.addr));
    let docs = run_orders(&url).await;
    let stderr = stop_all(procs).await;

    // Every step's span, in the order's trace: wait until as many as the
    // orders had steps have come (they should all be in already: each
    // worker flushed before it exited).
    let steps: usize = docs.iter().map(|(_, d)| d.history.len()).sum();
    let mut count = collector.count.clone();
    let arrived = tokio::time::timeout(Duration::from_secs(10), count.wait_for(|n| *n >= steps)).await;
    let spans = collector.spans();
    assert!(
        arrived.is_ok(),
        "{} of {steps} spans arrived: {spans:#?}\n{stderr:#?}",
        spans.len()
    );
    let service_of = |s: &str| format!("{}-worker", s.split('.').next().unwrap_or(s));
    for (kind, doc) in &docs {
        let want = match kind {
            Kind::Unshippable => Status::Compensated,
            _ => Status::Completed,
        };
        assert_eq!(doc.status, want, "{kind:?}: {:?}", doc.failure);
        let services = check_trace(doc, &spans, service_of);
        assert_eq!(
            services,
            ["inventory-worker", "payment-worker", "shipping-worker"],
            "{kind:?} order {}: one trace across the three processes",
            doc.id
        );
    }
    assert_eq!(spans.len(), steps, "no other span, none twice: {spans:#?}");
    let types = collector.content_types.lock().unwrap().clone();
    assert!(
        types.iter().all(|t| t == "application/x-protobuf"),
        "OTLP/HTTP with protobuf bodies: {types:?}"
    );
    // The ids are the engine's: the same as `headers::traceparent` gives.
    let first = &docs[0].1;
    let root = spans
        .iter()
        .find(|s| s.trace_id == first.id.as_uuid().as_u128() && s.parent_span_id == 0)
        .unwrap();
    assert_eq!(
        format!("00-{}-{}-01", TraceId::from(root.trace_id), SpanId::from(root.span_id)),
        format!("00-{}-0000000000000001-01", first.id.as_uuid().simple())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_away_neither_stops_nor_fails_the_workers() {
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let server = NatsServer::start();
    let url = server.url();
    setup(&url);
    let procs = workers(&url, &format!("http://{dead}"));
    let docs = run_orders(&url).await;
    for (kind, doc) in &docs {
        let want = match kind {
            Kind::Unshippable => Status::Compensated,
            _ => Status::Completed,
        };
        assert_eq!(doc.status, want, "{kind:?}: {:?}", doc.failure);
    }
    // Each drains and exits 0 (its last export failing on the way out),
    // saying so once at `warn`, never at `error`.
    let stderr = stop_all(procs).await;
    for (name, text) in &stderr {
        assert!(
            text.contains("cannot export spans to the collector"),
            "{name} said nothing of the collector: {text}"
        );
        assert!(!text.contains("ERROR"), "{name}: {text}");
    }
}

#[test]
fn a_bad_endpoint_is_refused_at_start_up() {
    for (arg, env, says) in [
        (Some("collector:4318"), None, "is not an http:// URL"),
        (Some("http://collector:http"), None, "has a port that is not a number"),
        (None, Some("https://collector:4318"), "https is not supported"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shipping-worker"));
        // NATS is never reached: the options are refused first.
        cmd.args(["--nats", "nats://127.0.0.1:1", "--connect-timeout", "0"]);
        if let Some(a) = arg {
            cmd.args(["--otlp-endpoint", a]);
        }
        match env {
            Some(e) => cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", e),
            None => cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT"),
        };
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{arg:?} {env:?}: {stderr}");
        assert!(
            stderr.contains("--otlp-endpoint") && stderr.contains(says),
            "{arg:?} {env:?}: {stderr}"
        );
    }
    // An empty variable is no endpoint (as OpenTelemetry reads its
    // variables): the worker goes on to NATS, and fails there.
    let out = Command::new(env!("CARGO_BIN_EXE_shipping-worker"))
        .args(["--nats", "nats://127.0.0.1:1", "--connect-timeout", "0"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not reach NATS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_exports_its_in_process_steps_one_trace_per_order() {
    let collector = Collector::start().await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_waybill"));
    cmd.args(["replay", "--no-progress", "examples/orders/happy.jsonl"])
        .args(["--otlp-endpoint", &format!("http://{}", collector.addr)])
        .current_dir(workspace_root())
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_RESOURCE_ATTRIBUTES");
    // The collector runs on this runtime: wait for the replay off it.
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 25 happy orders of three steps each, flushed as the replay ended.
    let spans = collector.spans();
    let mut traces: BTreeMap<u128, Vec<(u64, u64)>> = BTreeMap::new();
    for s in &spans {
        assert_eq!(s.service, "waybill-replay");
        traces
            .entry(s.trace_id)
            .or_default()
            .push((s.span_id, s.parent_span_id));
    }
    assert_eq!(traces.len(), 25, "{spans:#?}");
    for chain in traces.values_mut() {
        chain.sort_unstable();
        assert_eq!(chain, &[(1, 0), (2, 1), (3, 2)]);
    }
}
