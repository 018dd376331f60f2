//! Durable timers at scale: many orders put to sleep on a step's wait, what
//! their sleep costs every process, and how late they wake.
//!
//! One throwaway nats-server (file storage), and in this process a client
//! and a worker serving a two-step workflow: `hold` (does nothing), then
//! `wake` after `.delay(wait)`. Each order's `wake` hop is a message the
//! server schedules (`waybill.timer.<order>`), so while the orders sleep no
//! worker, task or lease holds them.
//!
//! 1. **Put to sleep**: starts `orders` orders, as fast as 1,024 in flight
//!    allow, and waits until each one's timer is stored (seen on a core
//!    subscription to `waybill.timer.>`).
//! 2. **Asleep**: over the window before the first one is due, the CPU of
//!    nats-server and of this process (the client and the worker), their
//!    resident memory against before the orders, and the stream's bytes.
//! 3. **Wake**: every order completes; an order's lateness is from when its
//!    `wake` step was due (its `hold` ended, plus the wait) to when the step
//!    started: the server's scheduler, the delivery and the worker's pickup.
//!
//! Bounds: phase 1 is the start path (two hops per order); phase 3 is the
//! wake-up rate the server's scheduler sustains, as the orders fall due at
//! the rate they were started.
//!
//! `cargo build --release -p waybill-benches --bin timers && WAYBILL_NATS_SERVER=$(scripts/install-nats-server) target/release/timers [orders] [wait_secs]`

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};
use waybill::transport::nats::{Nats, NatsConfig, HOPS_STREAM};
use waybill::{Client, Payload, Status, StepContext, StepOutput, Worker, Workflow};
use waybill_benches::cpu::{CpuProbe, Watched};
use waybill_testkit::NatsServer;

const IN_FLIGHT: usize = 1024;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let orders: usize = args.next().map_or(Ok(100_000), |a| a.parse()).context("orders")?;
    let wait_secs: u64 = args.next().map_or(Ok(60), |a| a.parse()).context("wait_secs")?;
    anyhow::ensure!(orders > 0 && wait_secs > 0, "orders and wait_secs must be above zero");
    let wait = Duration::from_secs(wait_secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = NatsServer::start();
    rt.block_on(run(&server, orders, wait))
}

async fn run(server: &NatsServer, orders: usize, wait: Duration) -> anyhow::Result<()> {
    let nats = Nats::connect(&server.url(), NatsConfig::default()).await?;
    let wf = Workflow::builder("sleep", 1)
        .step("hold", "bench.hold")
        .step("wake", "bench.wake")
        .delay(wait)
        .build()?;
    let server_rss_before = rss_kib(server.pid())?;
    let self_rss_before = rss_kib(std::process::id())?;
    let raw = async_nats::connect(server.url()).await?;
    let mut timers = raw.subscribe(waybill::subject::all_timers()).await?;
    raw.flush().await?;
    let worker = Worker::builder(nats.clone())
        .serve("bench.hold", |_ctx: StepContext, _p: Payload| async {
            Ok(StepOutput::ok())
        })
        .serve("bench.wake", |_ctx: StepContext, _p: Payload| async {
            Ok(StepOutput::ok())
        })
        .start()
        .await?;
    let client = Client::connect(nats.clone()).await?;

    // 1. Put to sleep.
    let began = Instant::now();
    let all_asleep = Arc::new(AtomicBool::new(false));
    let counting = tokio::spawn({
        let all_asleep = all_asleep.clone();
        async move {
            let mut seen = 0usize;
            while seen < orders {
                if timers.next().await.is_none() {
                    break;
                }
                seen += 1;
            }
            all_asleep.store(true, Ordering::Relaxed);
            seen
        }
    });
    let payload = Payload::postcard(&())?;
    let mut ids = Vec::with_capacity(orders);
    let mut starting = FuturesUnordered::new();
    for _ in 0..orders {
        if starting.len() >= IN_FLIGHT {
            if let Some(r) = starting.next().await {
                ids.push(r?);
            }
        }
        starting.push(client.start(&wf, payload.clone()));
    }
    while let Some(r) = starting.next().await {
        ids.push(r?);
    }
    let started_in = began.elapsed();
    let seen = tokio::time::timeout(wait, counting)
        .await
        .context("the timers were not all stored before the first was due")??;
    anyhow::ensure!(seen == orders, "saw {seen} timers of {orders}");
    let asleep_in = began.elapsed();
    println!(
        "put to sleep: {orders} orders started in {:.1} s ({:.0}/s), every timer stored after {:.1} s",
        started_in.as_secs_f64(),
        orders as f64 / started_in.as_secs_f64(),
        asleep_in.as_secs_f64()
    );

    // 2. Asleep: until a second before the first is due.
    let first_due = began + wait;
    let window = first_due.saturating_duration_since(Instant::now() + Duration::from_secs(1));
    anyhow::ensure!(
        window >= Duration::from_secs(2),
        "the orders took {:.1} s to fall asleep: give a wait well past that",
        asleep_in.as_secs_f64()
    );
    let probe = CpuProbe::start(vec![
        Watched::new("nats-server", server.pid()),
        Watched::this("client and worker"),
    ]);
    tokio::time::sleep(window).await; // the sleep being measured
    let cpu = probe.finish();
    let server_rss = rss_kib(server.pid())?;
    let self_rss = rss_kib(std::process::id())?;
    let stream = async_nats::jetstream::new(raw.clone())
        .get_stream(HOPS_STREAM)
        .await?
        .info()
        .await?
        .state
        .clone();
    println!(
        "asleep: {cpu}; resident nats-server {:.1} MiB (+{:.1}), client and worker {:.1} MiB (+{:.1}); \
         stream {} messages, {:.0} bytes per sleeping order",
        server_rss as f64 / 1024.0,
        (server_rss as f64 - server_rss_before as f64) / 1024.0,
        self_rss as f64 / 1024.0,
        (self_rss as f64 - self_rss_before as f64) / 1024.0,
        stream.messages,
        stream.bytes as f64 / orders as f64
    );

    // 3. Wake.
    let probe = CpuProbe::start(vec![
        Watched::new("nats-server", server.pid()),
        Watched::this("client and worker"),
    ]);
    let woke_from = Instant::now();
    let mut late_ms = Vec::with_capacity(orders);
    for id in &ids {
        let doc = tokio::time::timeout(wait + Duration::from_secs(120), client.wait(*id))
            .await
            .context("an order did not wake")??;
        anyhow::ensure!(doc.status == Status::Completed, "order {id} ended {}", doc.status);
        let (hold, wake) = (&doc.history[0], &doc.history[1]);
        let due = hold.ended_at.plus(wait);
        anyhow::ensure!(wake.started_at >= due, "order {id} woke before it was due");
        late_ms.push(wake.started_at.since(due).as_secs_f64() * 1000.0);
    }
    let cpu = probe.finish();
    late_ms.sort_by(f64::total_cmp);
    let q = |p: f64| late_ms[((late_ms.len() - 1) as f64 * p).round() as usize];
    println!(
        "wake: {orders} orders woke and completed within {:.1} s of the first due; lateness p50 {:.0} ms, \
         p99 {:.0} ms, max {:.0} ms; {cpu}; {}",
        woke_from.elapsed().as_secs_f64() + 1.0,
        q(0.5),
        q(0.99),
        q(1.0),
        cpu.per_unit(orders, "order")
    );
    worker.shutdown().await;
    client.close().await;
    Ok(())
}

/// Resident memory of a process, in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}
