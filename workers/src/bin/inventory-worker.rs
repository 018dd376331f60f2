//! `inventory-worker`: serves `inventory.reserve` and `inventory.release` over NATS.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use waybill_workers::cli::{worker_main, WorkerArgs};
use waybill_workers::services::kv::KvStock;
use waybill_workers::services::{serve_inventory, InventoryService};

/// Serves inventory.reserve and inventory.release: all lines or none, each
/// released once, never overselling.
///
/// Stock is the NATS KV bucket `inventory` (seeded by `waybill setup --stock
/// FILE`), changed only by compare-and-swap, shared by every inventory worker
/// on any host. SKUs not seeded have 1,000,000 units; `OOS-` SKUs none.
#[derive(Parser, Debug)]
#[command(name = "inventory-worker", version)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    worker_main("inventory-worker", args.worker, |nats, builder| async move {
        let svc = Arc::new(InventoryService::new(KvStock::open(&nats, Default::default()).await?));
        Ok(serve_inventory(&svc, builder))
    })
}
