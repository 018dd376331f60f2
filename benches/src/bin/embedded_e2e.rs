//! End-to-end benchmark of the embedded default: mixed orders through the
//! three steps (and their compensations) with workers, transport and client
//! in one process. Prints orders/s and p50/p99 latency per run, then the
//! median of the runs.
//!
//! `cargo run --release -p waybill-benches --bin embedded_e2e -- [orders] [runs] [in_flight]`
//! (set `WAYBILL_BENCH_ONE_THREAD=1` to run on one core)

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;

use anyhow::Context;
use waybill_workers::replay::{EmbeddedRuntime, ReplayOptions};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let orders: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100_000);
    let runs: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let in_flight: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2048);

    let prepared = waybill_benches::mixed_orders(orders)?;
    let stock: HashMap<String, i64> =
        serde_json::from_str(&std::fs::read_to_string(stock_path()).context("reading examples/stock.json")?)?;
    // WAYBILL_BENCH_NO_COORDINATOR=1 measures the engine alone, without
    // the coordinator `waybill replay` runs beside it.
    let opts = ReplayOptions {
        in_flight,
        coordinator: std::env::var_os("WAYBILL_BENCH_NO_COORDINATOR").is_none(),
        ..ReplayOptions::default()
    };

    // WAYBILL_BENCH_ONE_THREAD=1 measures on one core (a current-thread
    // runtime), for the cost per order without cross-thread traffic.
    let rt = if std::env::var_os("WAYBILL_BENCH_ONE_THREAD").is_some() {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()?
    };
    let mut rates = Vec::new();
    for run in 1..=runs {
        let (stock, opts2, prepared2) = (stock.clone(), opts.clone(), prepared.clone());
        // The driver runs on the runtime's workers, not on the main thread:
        // a wake-up across threads per finished order would cost more than
        // the order itself.
        let report = rt.block_on(async move {
            tokio::spawn(async move {
                let engine = EmbeddedRuntime::start(stock, &opts2).await?;
                let report = engine.run("mixed", &prepared2, &opts2, |_, _| {}).await;
                let check = engine.check(std::slice::from_ref(&report)).await;
                engine.shutdown().await;
                anyhow::ensure!(
                    check.disagreements.is_empty(),
                    "the coordinator disagrees: {:?}",
                    check.disagreements
                );
                anyhow::Ok(report)
            })
            .await?
        })?;
        anyhow::ensure!(
            report.ok(),
            "run {run}: {} orders did not end as expected",
            report.mismatches.len()
        );
        println!(
            "run {run}: {} orders in {:.2} s: {:.0} orders/s overall, {:.0} orders/s sustained, p50 {:.2} ms, p99 {:.2} ms",
            report.orders,
            report.seconds,
            report.orders_per_sec,
            report.steady_orders_per_sec,
            report.p50_ms,
            report.p99_ms
        );
        rates.push((
            report.orders_per_sec,
            report.steady_orders_per_sec,
            report.p50_ms,
            report.p99_ms,
        ));
    }
    let median = |f: fn(&(f64, f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = rates.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "median of {runs} runs (in flight {in_flight}): {:.0} orders/s overall, {:.0} orders/s sustained, p50 {:.2} ms, p99 {:.2} ms",
        median(|r| r.0),
        median(|r| r.1),
        median(|r| r.2),
        median(|r| r.3)
    );
    Ok(())
}

fn stock_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/stock.json")
}
