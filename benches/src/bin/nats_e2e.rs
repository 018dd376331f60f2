//! End to end over NATS JetStream, against a raw async-nats baseline, in one
//! run on one throwaway nats-server (file storage).
//!
//! - **engine**: `waybill setup`, the three worker binaries as processes,
//!   and mixed orders started and followed by a client in this process; once
//!   with the services' state in memory (the engine's own cost) and once in
//!   KV buckets (as deployed on many hosts).
//! - **raw**: the same number of documents of the same size moved through
//!   three hops by three tasks in this process, each on its own connection,
//!   with the same durability (stream storage, publish acknowledgements,
//!   deduplication ids, explicit acks, input acked after the output is
//!   stored) and no engine: no decoding, no routing, no state.
//!
//! Build the workers first; they are found beside this binary:
//! `cargo build --release -p waybill-workers -p waybill-benches && target/release/nats_e2e [orders] [in_flight]`

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::future::IntoFuture;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use waybill::transport::nats::Nats;
use waybill::transport::NatsConfig;
use waybill::{Client, Codec, Document, Format, OrderId};
use waybill_benches::bin;
use waybill_testkit::{NatsServer, Proc};
use waybill_workers::replay::{self, ReplayOptions};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let orders: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20_000);
    let in_flight: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;

    let mut engine = None;
    let mut doc_size = 0;
    for state in ["memory", "kv"] {
        let server = NatsServer::start();
        let (report, size) = rt.block_on(engine_run(&server.url(), orders, in_flight, state))?;
        println!(
            "engine, services' state in {state:>6}: {orders} mixed orders, 3 worker processes: {:.0} orders/s \
             ({:.0} sustained), p50 {:.2} ms, p99 {:.2} ms",
            report.orders_per_sec, report.steady_orders_per_sec, report.p50_ms, report.p99_ms
        );
        doc_size = size;
        engine.get_or_insert(report);
    }
    let engine = engine.context("no engine run")?;
    let server = NatsServer::start();
    let raw = rt.block_on(raw_run(&server.url(), orders, in_flight, doc_size))?;
    println!(
        "raw:    {orders} documents of {doc_size} bytes, 3 hops: {:.0} docs/s, p50 {:.2} ms, p99 {:.2} ms",
        raw.0, raw.1, raw.2
    );
    println!(
        "engine (state in memory) / raw throughput: {:.2}",
        engine.orders_per_sec / raw.0
    );
    Ok(())
}

async fn engine_run(
    url: &str,
    orders: usize,
    in_flight: usize,
    state: &str,
) -> anyhow::Result<(replay::FileReport, usize)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(bin("waybill")?)
        .args(["setup", "--nats", url, "--stock", "examples/stock.json"])
        .current_dir(&root)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "waybill setup failed");
    let mut workers = Vec::new();
    for name in ["payment-worker", "inventory-worker", "shipping-worker"] {
        let mut cmd = Command::new(bin(name)?);
        cmd.args(["--nats", url, "--state", state])
            .current_dir(&root)
            .env("RUST_LOG", "warn");
        if name == "inventory-worker" && state == "memory" {
            cmd.args(["--stock", "examples/stock.json"]);
        }
        workers.push(Proc::spawn(name, cmd));
    }
    let prepared = waybill_benches::mixed_orders(orders)?;
    // The size of a document on its last hop, for the raw baseline.
    let doc = Document::new(
        OrderId::new(),
        prepared[0].workflow.shared_route(),
        prepared[0].payload.clone(),
    );
    let doc_size = Codec::default().encode(&doc, Format::Postcard)?.len() + 3 * 90;

    let nats = Nats::connect(url, NatsConfig::default()).await?;
    let client = Client::connect(nats).await?;
    let opts = ReplayOptions {
        in_flight,
        ..ReplayOptions::default()
    };
    let report = replay::run_orders(&client, "mixed", &prepared, &opts, |_, _| {}).await;
    client.close().await;
    for w in workers {
        w.signal_and_wait("TERM", Duration::from_secs(30));
    }
    anyhow::ensure!(
        report.ok(),
        "{} orders did not end as expected",
        report.mismatches.len()
    );
    Ok((report, doc_size))
}

/// One raw hop: take from `from`, publish to `to` (stored, deduplicated),
/// then ack the input.
async fn raw_hop(url: String, from: &'static str, to: &'static str) -> anyhow::Result<()> {
    let js = jetstream::new(async_nats::connect(&url).await?);
    let stream = js.get_stream("RAW").await?;
    let consumer = stream
        .get_or_create_consumer(
            from,
            pull::Config {
                durable_name: Some(from.into()),
                filter_subject: format!("raw.{from}"),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(m) = messages.next() => {
                let m = m?;
                let js = js.clone();
                running.push(async move {
                    let id = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.to_string()).unwrap_or_default();
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Nats-Msg-Id", format!("{id}>{to}").as_str());
                    h.insert("Raw-Id", m.headers.as_ref().and_then(|h| h.get("Raw-Id")).map(|v| v.to_string()).unwrap_or_default().as_str());
                    js.publish_with_headers(format!("raw.{to}"), h, m.payload.clone()).await?.await?;
                    m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))
                });
            }
            Some(r) = running.next(), if !running.is_empty() => r?,
        }
    }
}

async fn raw_run(url: &str, docs: usize, in_flight: usize, size: usize) -> anyhow::Result<(f64, f64, f64)> {
    let js = jetstream::new(async_nats::connect(url).await?);
    js.create_stream(stream::Config {
        name: "RAW".into(),
        subjects: vec!["raw.>".into()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let hops: Vec<_> = [("h1", "h2"), ("h2", "h3"), ("h3", "done")]
        .into_iter()
        .map(|(from, to)| tokio::spawn(raw_hop(url.to_owned(), from, to)))
        .collect();
    let done = js
        .get_stream("RAW")
        .await?
        .create_consumer(pull::Config {
            durable_name: Some("done".into()),
            filter_subject: "raw.done".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut finished = done.messages().await?;
    let payload = Bytes::from(vec![7u8; size]);
    let started_at: Arc<Vec<std::sync::Mutex<Option<Instant>>>> =
        Arc::new((0..docs).map(|_| std::sync::Mutex::new(None)).collect());
    let began = Instant::now();
    let mut latencies = Vec::with_capacity(docs);
    let (mut sent, mut pending) = (0usize, FuturesUnordered::new());
    while latencies.len() < docs {
        while sent < docs && sent - latencies.len() < in_flight {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("{sent}").as_str());
            h.insert("Raw-Id", format!("{sent}").as_str());
            if let Ok(mut slot) = started_at[sent].lock() {
                *slot = Some(Instant::now());
            }
            pending.push(
                js.publish_with_headers("raw.h1", h, payload.clone())
                    .await?
                    .into_future(),
            );
            sent += 1;
        }
        tokio::select! {
            Some(ack) = pending.next(), if !pending.is_empty() => { ack?; }
            Some(m) = finished.next() => {
                let m = m?;
                let i: usize = m.headers.as_ref().and_then(|h| h.get("Raw-Id")).and_then(|v| v.as_str().parse().ok()).unwrap_or(0);
                if let Some(t) = started_at[i].lock().ok().and_then(|s| *s) {
                    latencies.push(t.elapsed().as_micros() as u64);
                }
                m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
    }
    let secs = began.elapsed().as_secs_f64();
    for h in hops {
        h.abort();
    }
    latencies.sort_unstable();
    Ok((
        docs as f64 / secs,
        replay::percentile_ms(&latencies, 50.0),
        replay::percentile_ms(&latencies, 99.0),
    ))
}
