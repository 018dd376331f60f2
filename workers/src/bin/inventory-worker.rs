//! `inventory-worker`: serves `inventory.reserve` and `inventory.release` over NATS.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use waybill_workers::cli::{worker_main, StateArg, WorkerArgs};
use waybill_workers::replay::load_stock;
use waybill_workers::services::kv::KvStock;
use waybill_workers::services::{serve_inventory, InventoryService, MemoryStock};

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
    /// With `--state memory`: the initial stock, a JSON object of SKU → units
    /// (with `--state kv`, `waybill setup --stock FILE` seeds it).
    #[arg(long, value_name = "FILE")]
    stock: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let state = args.worker.state;
    let seed = args.stock.clone();
    worker_main("inventory-worker", args.worker, move |nats, builder| async move {
        Ok(match state {
            StateArg::Kv => {
                let stock = KvStock::open(&nats, Default::default()).await?;
                serve_inventory(&Arc::new(InventoryService::new(stock)), builder)
            }
            StateArg::Memory => {
                let seed = seed.map(|p| load_stock(&p)).transpose()?.unwrap_or_default();
                serve_inventory(&Arc::new(InventoryService::new(MemoryStock::new(seed))), builder)
            }
        })
    })
}
