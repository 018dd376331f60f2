//! `payment-worker`: serves `payment.charge` and `payment.refund` over NATS.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use waybill_workers::cli::{worker_main, WorkerArgs};
use waybill_workers::services::kv::KvLedger;
use waybill_workers::services::{serve_payment, PaymentService};

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
    worker_main("payment-worker", args.worker, |nats, builder| async move {
        let svc = Arc::new(PaymentService::new(KvLedger::open(&nats).await?));
        Ok(serve_payment(&svc, builder))
    })
}
