//! `payment-worker`: serves `payment.charge` and `payment.refund` over NATS.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use waybill_workers::cli::{worker_main, StateArg, WorkerArgs};
use waybill_workers::services::kv::KvLedger;
use waybill_workers::services::{serve_payment, MemoryLedger, PaymentService};

/// Serves payment.charge and payment.refund: charges each order once, refunds once.
///
/// The ledger is the NATS KV bucket `payments` (created by `waybill setup`),
/// shared by every payment worker on any host.
#[derive(Parser, Debug)]
#[command(name = "payment-worker", version)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let state = args.worker.state;
    worker_main("payment-worker", args.worker, move |nats, builder| async move {
        Ok(match state {
            StateArg::Kv => serve_payment(&Arc::new(PaymentService::new(KvLedger::open(&nats).await?)), builder),
            StateArg::Memory => serve_payment(&Arc::new(PaymentService::new(MemoryLedger::default())), builder),
        })
    })
}
