//! The coordinator at scale, on one throwaway nats-server (file storage):
//!
//! 1. fills `WAYBILL_HOPS` with `orders` orders at hop 0 (mixed order
//!    payloads) and a quarter of them again at hop 1 (one step done, its
//!    record in the history): `1.25 × orders` hops, every order in flight;
//! 2. starts `waybill coordinator` (the release binary, as deployed) and
//!    times its replay of the stream, as it reports it;
//! 3. reads the process's resident memory (VmRSS) once it has caught up,
//!    against a coordinator on an empty stream, and the view's own bytes;
//! 4. measures `waybill.status.<id>` latency (sequential requests for
//!    random orders) while hops keep arriving at full speed;
//! 5. reads how long the web page's once-a-second dashboard holds the view
//!    (`dashboard_ms` of `GET /api/live`, one pass over every order).
//!
//! `cargo build --release -p waybill-workers -p waybill-benches && target/release/coordinator [orders]`

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::stream::StreamExt;
use waybill::coordinator::api::OrdersQuery;
use waybill::coordinator::CoordinatorClient;
use waybill::transport::nats::Nats;
use waybill::transport::{NatsConfig, Outgoing, Transport};
use waybill::{
    headers, AttemptResult, Codec, DedupId, Document, Format, MsgId, OrderId, StepKind, StepRecord, Timestamp, WorkerId,
};
use waybill_benches::{bin, mixed_orders};
use waybill_testkit::{NatsServer, Proc};
use waybill_workers::replay::percentile_ms;

fn main() -> anyhow::Result<()> {
    let orders: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;

    // A coordinator with nothing to track, for the resident memory it
    // starts with.
    let empty = NatsServer::start();
    rt.block_on(Nats::connect(&empty.url(), NatsConfig::default()))?;
    let mut idle = coordinator(&empty.url(), false)?;
    idle.expect_stderr("replayed 0 hops", Duration::from_secs(30));
    let base_rss = rss_kib(idle.pid())?;
    drop(idle);
    drop(empty);

    let server = NatsServer::start();
    let url = server.url();
    let nats = rt.block_on(Nats::connect(&url, NatsConfig::default()))?;
    let docs = Docs::new(orders)?;
    let began = Instant::now();
    let hop0 = rt.block_on(publish(&nats, (0..orders).map(|i| docs.hop(i, 0)).collect()))?;
    let hop1 = rt.block_on(publish(&nats, (0..orders / 4).map(|i| docs.hop(i, 1)).collect()))?;
    let hops = hop0 + hop1;
    println!(
        "stream: {hops} hops of {orders} orders (every one in flight) stored in {:.1} s; documents of {}–{} bytes",
        began.elapsed().as_secs_f64(),
        docs.size(0, 0),
        docs.size(0, 1)
    );

    let server_cpu = cpu_seconds(server.pid())?;
    let mut coord = coordinator(&url, true)?;
    let page = coord.expect_stderr("the operator's page on http://", Duration::from_secs(60));
    let page: u16 = page
        .rsplit("127.0.0.1:")
        .next()
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .context("no port in the page's log line")?;
    let line = coord.expect_stderr("coordinator 0/1: replayed", Duration::from_secs(600));
    let rss = rss_kib(coord.pid())?;
    println!(
        "replay: {}; CPU used meanwhile: coordinator {:.2} s, nats-server {:.2} s",
        line.trim_start_matches("coordinator 0/1: "),
        cpu_seconds(coord.pid())?,
        cpu_seconds(server.pid())? - server_cpu
    );
    let coordinators = CoordinatorClient::new(nats.clone(), REQUEST_TIMEOUT);
    let summary = rt.block_on(coordinators.orders(&OrdersQuery {
        limit: Some(0),
        ..OrdersQuery::default()
    }))?;
    let tracked = summary.summary.tracked;
    let view_bytes = summary.feeds.first().map_or(0, |f| f.view_bytes);
    println!(
        "memory: {tracked} orders tracked ({} in flight); resident {:.1} MiB (idle coordinator {:.1} MiB): \
         {:.0} bytes per tracked order; the view's tables {:.1} MiB ({:.0} bytes per order)",
        summary.summary.in_flight,
        rss as f64 / 1024.0,
        base_rss as f64 / 1024.0,
        (rss - base_rss) as f64 * 1024.0 / tracked.max(1) as f64,
        view_bytes as f64 / (1024.0 * 1024.0),
        view_bytes as f64 / tracked.max(1) as f64
    );

    // Status requests while hops keep coming: the second quarter of the
    // orders moves to hop 1 as fast as the stream takes it.
    let load_docs: Vec<Outgoing> = (orders / 4..orders / 2).map(|i| docs.hop(i, 1)).collect();
    let load_n = load_docs.len();
    let (latencies, load_rate) = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn({
            let nats = nats.clone();
            let stop = stop.clone();
            async move {
                let t = Instant::now();
                let r = publish(&nats, load_docs).await;
                stop.store(true, Ordering::Relaxed);
                r.map(|n| n as f64 / t.elapsed().as_secs_f64())
            }
        });
        let mut lat = Vec::new();
        let mut failed = 0usize;
        while !stop.load(Ordering::Relaxed) && lat.len() < 20_000 {
            let i = fastrand_index(orders);
            let t = Instant::now();
            match coordinators.status(&docs.ids[i]).await {
                Ok(s) if s.id == docs.ids[i] => lat.push(t.elapsed().as_micros() as u64),
                _ => failed += 1,
            }
        }
        anyhow::ensure!(failed == 0, "{failed} status requests failed");
        let rate = load.await??;
        anyhow::Ok((lat, rate))
    })?;
    let mut sorted = latencies;
    sorted.sort_unstable();
    println!(
        "status: {} requests while {load_n} hops arrived at {load_rate:.0} hops/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        sorted.len(),
        percentile_ms(&sorted, 50.0),
        percentile_ms(&sorted, 99.0),
        percentile_ms(&sorted, 100.0)
    );
    // The page's snapshot is taken once a second: read a few.
    let mut took = Vec::new();
    for _ in 0..7 {
        std::thread::sleep(Duration::from_millis(1100));
        let live: serde_json::Value = serde_json::from_str(&waybill_testkit::http_get(page, "/api/live")?)?;
        took.push(live["dashboard_ms"].as_f64().context("no dashboard_ms")?);
    }
    took.sort_by(f64::total_cmp);
    println!(
        "web page: the dashboard of {tracked} orders takes {:.1} ms (median of {}; max {:.1} ms) once a second",
        took[took.len() / 2],
        took.len(),
        took[took.len() - 1]
    );
    let (status, _) = coord.signal_and_wait("TERM", Duration::from_secs(30));
    anyhow::ensure!(status.success(), "the coordinator exited with {status}");
    Ok(())
}

fn coordinator(url: &str, http: bool) -> anyhow::Result<Proc> {
    let mut c = Command::new(bin("waybill")?);
    c.args(["coordinator", "--nats", url])
        .env("RUST_LOG", "warn,waybill_workers::ops=info");
    if http {
        c.args(["--http", "127.0.0.1:0"]);
    }
    Ok(Proc::spawn("waybill coordinator", c))
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// User plus system CPU time of a process so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unreadable /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}

fn fastrand_index(n: usize) -> usize {
    use std::cell::Cell;
    thread_local!(static STATE: Cell<u64> = const { Cell::new(0x9e37_79b9_7f4a_7c15) });
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x % n as u64) as usize
    })
}

/// How long a request waits for the coordinator's answer (async-nats's
/// default request time-out).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The documents of the run: one payload per order, from the mixed flows.
struct Docs {
    ids: Vec<OrderId>,
    payloads: Vec<waybill::Payload>,
    workflow: waybill::Workflow,
    codec: Codec,
}

impl Docs {
    fn new(n: usize) -> anyhow::Result<Self> {
        let sample = mixed_orders(1000)?;
        let workflow = sample[0].workflow.clone();
        Ok(Self {
            ids: (0..n).map(|_| OrderId::new()).collect(),
            payloads: (0..n).map(|i| sample[i % sample.len()].payload.clone()).collect(),
            workflow,
            codec: Codec::default(),
        })
    }

    fn doc(&self, i: usize, hop: u32) -> Document {
        let mut d = Document::new(self.ids[i], self.workflow.shared_route(), self.payloads[i].clone());
        if hop == 1 {
            let step = &self.workflow.route().steps[0];
            let now = Timestamp::now();
            d.history.push(StepRecord {
                step: step.name.clone(),
                service: step.service.clone(),
                kind: StepKind::Forward,
                attempt: 1,
                result: AttemptResult::Outcome("ok".into()),
                detail: Some("charged 12345 cents".into()),
                started_at: now,
                ended_at: now,
                worker: WorkerId::new("bench-1"),
            });
            d.hop = 1;
            d.step = 1;
        }
        d
    }

    fn size(&self, i: usize, hop: u32) -> usize {
        self.codec
            .encode(&self.doc(i, hop), Format::Postcard)
            .map_or(0, |b| b.len())
    }

    fn hop(&self, i: usize, hop: u32) -> Outgoing {
        let d = self.doc(i, hop);
        let service = d.target().map(|t| t.service.clone());
        Outgoing {
            subject: waybill::subject::hop(service.as_ref().unwrap_or(&self.workflow.route().steps[0].service)),
            msg_id: Some(MsgId::hop(DedupId::main(d.id, hop))),
            headers: headers::for_hop(&d, Format::Postcard),
            payload: Bytes::from(self.codec.encode(&d, Format::Postcard).unwrap_or_default()),
            due: None,
        }
    }
}

/// Publishes every message, 1,024 acknowledgements outstanding at once.
async fn publish(nats: &Nats, out: Vec<Outgoing>) -> anyhow::Result<usize> {
    let n = out.len();
    let mut acks = futures::stream::iter(out.into_iter().map(|o| nats.publish(o))).buffer_unordered(1024);
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(n)
}
