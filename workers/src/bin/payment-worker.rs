//! `payment-worker`: serves `payment.charge` and `payment.refund` over NATS.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use waybill_workers::cli::{worker_main, WorkerArgs};
use waybill_workers::services::{serve_payment, MemoryLedger, PaymentService};

/// Serves payment.charge and payment.refund: charges each order once, refunds once.
///
/// The ledger is kept in this process's memory for now: run one payment
/// worker (a ledger in a NATS KV bucket, shared by many, is to come).
#[derive(Parser, Debug)]
#[command(name = "payment-worker", version)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    worker_main("payment-worker", args.worker, |builder| {
        let svc = Arc::new(PaymentService::new(MemoryLedger::default()));
        Ok(serve_payment(&svc, builder))
    })
}
