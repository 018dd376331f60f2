//! `shipping-worker`: serves `shipping.dispatch` over NATS.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use waybill_workers::cli::{worker_main, WorkerArgs};
use waybill_workers::services::{serve_shipping, MemoryShipments, ShippingService};

/// Serves shipping.dispatch: refuses country XX, otherwise records a tracking
/// number derived from the order id (the same on every redelivery).
#[derive(Parser, Debug)]
#[command(name = "shipping-worker", version)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    worker_main("shipping-worker", args.worker, |_nats, builder| async move {
        let svc = Arc::new(ShippingService::new(MemoryShipments::default()));
        Ok(serve_shipping(&svc, builder))
    })
}
