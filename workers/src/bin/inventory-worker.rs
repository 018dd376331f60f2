//! `inventory-worker`: serves `inventory.reserve` and `inventory.release` over NATS.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use waybill_workers::cli::{worker_main, WorkerArgs};
use waybill_workers::replay::load_stock;
use waybill_workers::services::{serve_inventory, InventoryService, MemoryStock};

/// Serves inventory.reserve and inventory.release: all lines or none, each
/// released once.
///
/// Stock is kept in this process's memory for now, seeded from --stock: run
/// one inventory worker (stock in a NATS KV bucket, shared by many, is to
/// come).
#[derive(Parser, Debug)]
#[command(name = "inventory-worker", version)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
    /// Initial stock, a JSON object of SKU → units. SKUs not listed have
    /// 1,000,000 units; `OOS-` SKUs none.
    #[arg(long, value_name = "FILE")]
    stock: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let stock = args.stock.clone();
    worker_main("inventory-worker", args.worker, move |builder| {
        let seed = match stock {
            Some(path) => load_stock(&path)?,
            None => Default::default(),
        };
        let svc = Arc::new(InventoryService::new(MemoryStock::new(seed)));
        Ok(serve_inventory(&svc, builder))
    })
}
