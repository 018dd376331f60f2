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
//! After each run it says where the time went: the CPU each process used
//! over the timed part (nats-server, each worker, this process as the
//! client) as a share of the wall time, and the machine's other busy time;
//! the messages each stream stored per order (the hops, each KV bucket);
//! and each worker's KV operations per order, from the `kv ops:` line it
//! prints at exit (`n/a` if none).
//!
//! Paced: `--rate N` starts N orders (documents) per second, from
//! deadlines counted from the run's start, instead of as many as
//! `in_flight` allows; `--paced-at-half` runs as fast as it can first, then
//! each engine run again at half its rate, with raw at the same pace.
//! Latencies of a paced run count from when each order was due.
//!
//! Each worker process runs on `--threads N` runtime threads (default 1:
//! five busy processes share this machine's two cores, and a single thread
//! hands nothing between threads; the workers' own default is one per
//! core).
//!
//! Build the workers first; they are found beside this binary:
//! `cargo build --release -p waybill-workers -p waybill-benches && target/release/nats_e2e [orders] [in_flight] [--rate N | --paced-at-half] [--threads N]`

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
use waybill_benches::counts::{KvOps, KvOpsPerOrder, PerOrder, StreamSeqs};
use waybill_benches::cpu::{CpuProbe, CpuReport, Watched};
use waybill_testkit::{NatsServer, Proc};
use waybill_workers::replay::{self, ReplayOptions};

const WORKERS: [&str; 3] = ["payment-worker", "inventory-worker", "shipping-worker"];

/// The command line: `[orders] [in_flight] [--rate N | --paced-at-half]`.
#[derive(Debug, Clone, Copy)]
struct Args {
    orders: usize,
    in_flight: usize,
    /// Runtime threads of each worker process (`--threads`).
    threads: u16,
    rate: Option<f64>,
    paced_at_half: bool,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut positional = Vec::new();
        let (mut rate, mut paced_at_half, mut threads) = (None, false, 1u16);
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--rate" => {
                    let n: f64 = args.next().context("--rate needs orders per second")?.parse()?;
                    anyhow::ensure!(n.is_finite() && n > 0.0, "--rate must be a positive number");
                    rate = Some(n);
                }
                "--paced-at-half" => paced_at_half = true,
                "--threads" => {
                    threads = args.next().context("--threads needs a number")?.parse()?;
                    anyhow::ensure!(threads >= 1, "--threads must be at least 1");
                }
                flag if flag.starts_with("--") => anyhow::bail!(
                    "unknown option {flag}; usage: nats_e2e [orders] [in_flight] [--rate N | --paced-at-half] [--threads N]"
                ),
                _ => positional.push(a.parse::<usize>()?),
            }
        }
        anyhow::ensure!(positional.len() <= 2, "at most two numbers: orders and in_flight");
        anyhow::ensure!(
            !(rate.is_some() && paced_at_half),
            "--rate and --paced-at-half: one or the other"
        );
        Ok(Self {
            orders: positional.first().copied().unwrap_or(20_000),
            in_flight: positional.get(1).copied().unwrap_or(1024),
            threads,
            rate,
            paced_at_half,
        })
    }
}

/// Where a run's time went, and what it stored.
#[derive(Debug)]
struct Measured {
    cpu: CpuReport,
    /// Orders (documents) the run moved, and what it calls them.
    units: (usize, &'static str),
    stored: PerOrder,
    /// Engine runs only.
    kv: Option<KvOpsPerOrder>,
}

impl Measured {
    fn print(&self) {
        println!("  {}", self.cpu);
        println!("  {}", self.cpu.per_unit(self.units.0, self.units.1));
        println!("  {}", self.stored);
        if let Some(kv) = &self.kv {
            println!("  {kv}");
        }
    }
}

/// A raw run's figures.
#[derive(Debug)]
struct Raw {
    docs_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let Args { orders, in_flight, .. } = args;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;

    if let Some(rate) = args.rate {
        // Paced only: the three runs at the same pace.
        let mut doc_size = 0;
        for state in ["memory", "kv"] {
            let (report, size, m) = engine(&rt, &args, state, Some(rate))?;
            print_paced_engine(rate, state, orders, &report);
            m.print();
            doc_size = size;
        }
        let (raw, m) = raw(&rt, orders, in_flight, doc_size, Some(rate))?;
        print_paced_raw(rate, orders, doc_size, &raw);
        m.print();
        return Ok(());
    }

    let mut peaks = Vec::new();
    let mut doc_size = 0;
    for state in ["memory", "kv"] {
        let (report, size, m) = engine(&rt, &args, state, None)?;
        println!(
            "engine, services' state in {state:>6}: {orders} mixed orders, 3 worker processes: {:.0} orders/s \
             ({:.0} sustained), p50 {:.2} ms, p99 {:.2} ms",
            report.orders_per_sec, report.steady_orders_per_sec, report.p50_ms, report.p99_ms
        );
        m.print();
        doc_size = size;
        peaks.push((state, report.orders_per_sec));
    }
    let (raw_peak, m) = raw(&rt, orders, in_flight, doc_size, None)?;
    println!(
        "raw:    {orders} documents of {doc_size} bytes, 3 hops: {:.0} docs/s, p50 {:.2} ms, p99 {:.2} ms",
        raw_peak.docs_per_sec, raw_peak.p50_ms, raw_peak.p99_ms
    );
    m.print();
    let memory_peak = peaks.first().map(|p| p.1).context("no engine run")?;
    println!(
        "engine (state in memory) / raw throughput: {:.2}",
        memory_peak / raw_peak.docs_per_sec
    );

    if args.paced_at_half {
        // Each engine run at half its own rate, and raw at that pace.
        for (state, peak) in peaks {
            let rate = peak / 2.0;
            let (report, _, m) = engine(&rt, &args, state, Some(rate))?;
            print_paced_engine(rate, state, orders, &report);
            m.print();
            let (raw, m) = raw(&rt, orders, in_flight, doc_size, Some(rate))?;
            print_paced_raw(rate, orders, doc_size, &raw);
            m.print();
        }
    }
    Ok(())
}

/// One engine run on a server of its own.
fn engine(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    state: &str,
    rate: Option<f64>,
) -> anyhow::Result<(replay::FileReport, usize, Measured)> {
    let server = NatsServer::start();
    rt.block_on(engine_run(&server, args, state, rate))
}

/// One raw run on a server of its own.
fn raw(
    rt: &tokio::runtime::Runtime,
    docs: usize,
    in_flight: usize,
    size: usize,
    rate: Option<f64>,
) -> anyhow::Result<(Raw, Measured)> {
    let server = NatsServer::start();
    rt.block_on(raw_run(&server, docs, in_flight, size, rate))
}

fn print_paced_engine(rate: f64, state: &str, orders: usize, report: &replay::FileReport) {
    println!(
        "paced at {rate:.0}/s, engine, state in {state:>6}: {orders} mixed orders: {:.0} orders/s, \
         p50 {:.2} ms, p99 {:.2} ms",
        report.orders_per_sec, report.p50_ms, report.p99_ms
    );
}

fn print_paced_raw(rate: f64, docs: usize, size: usize, raw: &Raw) {
    println!(
        "paced at {rate:.0}/s, raw: {docs} documents of {size} bytes, 3 hops: {:.0} docs/s, \
         p50 {:.2} ms, p99 {:.2} ms",
        raw.docs_per_sec, raw.p50_ms, raw.p99_ms
    );
}

async fn engine_run(
    server: &NatsServer,
    args: &Args,
    state: &str,
    rate: Option<f64>,
) -> anyhow::Result<(replay::FileReport, usize, Measured)> {
    let Args { orders, in_flight, .. } = *args;
    let url = server.url();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(bin("waybill")?)
        .args(["setup", "--nats", &url, "--stock", "examples/stock.json"])
        .current_dir(&root)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "waybill setup failed");
    let mut workers = Vec::new();
    for name in WORKERS {
        let mut cmd = Command::new(bin(name)?);
        // Warnings, and the line saying the worker serves.
        cmd.args(["--nats", &url, "--state", state, "--threads", &args.threads.to_string()])
            .current_dir(&root)
            .env("RUST_LOG", "warn,waybill_workers::cli=info");
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

    // The timed part starts once every worker is pulling: their start is
    // not in the figures (it was, in runs before issue 13).
    for w in &mut workers {
        w.expect_stderr("serving", Duration::from_secs(30));
    }
    let nats = Nats::connect(&url, NatsConfig::default()).await?;
    let client = Client::connect(nats).await?;
    // A connection of our own, for stream info.
    let js = jetstream::new(async_nats::connect(&url).await?);
    let before = StreamSeqs::read(&js).await?;
    let opts = ReplayOptions {
        in_flight,
        ..ReplayOptions::default()
    };
    let mut watched = vec![Watched::new("nats-server", server.pid())];
    watched.extend(workers.iter().map(|w| Watched::new(w.name.clone(), w.pid())));
    watched.push(Watched::this("client"));
    let probe = CpuProbe::start(watched);
    let report = match rate {
        Some(r) => replay::run_orders_paced(&client, "mixed", &prepared, &opts, r, |_, _| {}).await,
        None => replay::run_orders(&client, "mixed", &prepared, &opts, |_, _| {}).await,
    };
    let cpu = probe.finish();
    client.close().await;
    // Drained workers have written all they will: their KV operations
    // and the streams' sequences are final.
    let mut kv = KvOpsPerOrder {
        orders,
        workers: Vec::new(),
    };
    for w in workers {
        let name = w.name.clone();
        let (_, stderr) = w.signal_and_wait("TERM", Duration::from_secs(30));
        kv.workers.push((name, KvOps::parse(&stderr)));
    }
    let stored = StreamSeqs::read(&js).await?.per_order_since(&before, orders);
    anyhow::ensure!(
        report.ok(),
        "{} orders did not end as expected",
        report.mismatches.len()
    );
    Ok((
        report,
        doc_size,
        Measured {
            cpu,
            units: (orders, "order"),
            stored,
            kv: Some(kv),
        },
    ))
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

async fn raw_run(
    server: &NatsServer,
    docs: usize,
    in_flight: usize,
    size: usize,
    rate: Option<f64>,
) -> anyhow::Result<(Raw, Measured)> {
    let url = server.url();
    let url = url.as_str();
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
    let before = StreamSeqs::read(&js).await?;
    let probe = CpuProbe::start(vec![
        Watched::new("nats-server", server.pid()),
        Watched::this("client + 3 raw hops (this process)"),
    ]);
    let began = Instant::now();
    // When document `i` is due (paced), from the run's start: a late one
    // does not push the later ones back.
    let due = |i: usize| rate.map(|r| began + Duration::from_secs_f64(i as f64 / r));
    let mut latencies = Vec::with_capacity(docs);
    let (mut sent, mut pending) = (0usize, FuturesUnordered::new());
    while latencies.len() < docs {
        while sent < docs && sent - latencies.len() < in_flight {
            let now = Instant::now();
            let start = match due(sent) {
                Some(at) if at > now => break,
                Some(at) => at,
                None => now,
            };
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("{sent}").as_str());
            h.insert("Raw-Id", format!("{sent}").as_str());
            if let Ok(mut slot) = started_at[sent].lock() {
                *slot = Some(start);
            }
            pending.push(
                js.publish_with_headers("raw.h1", h, payload.clone())
                    .await?
                    .into_future(),
            );
            sent += 1;
        }
        let waiting = due(sent).filter(|_| sent < docs && sent - latencies.len() < in_flight);
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
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(waiting.unwrap_or(began))), if waiting.is_some() => {}
        }
    }
    let secs = began.elapsed().as_secs_f64();
    let cpu = probe.finish();
    for h in hops {
        h.abort();
    }
    let stored = StreamSeqs::read(&js).await?.per_order_since(&before, docs);
    latencies.sort_unstable();
    Ok((
        Raw {
            docs_per_sec: docs as f64 / secs,
            p50_ms: replay::percentile_ms(&latencies, 50.0),
            p99_ms: replay::percentile_ms(&latencies, 99.0),
        },
        Measured {
            cpu,
            units: (docs, "document"),
            stored,
            kv: None,
        },
    ))
}
