//! `trip-worker`: serves the trip workflow's services over NATS.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use waybill_workers::cli::{worker_main, WorkerArgs};
use waybill_workers::services::{serve_trip, TripService};

/// Serves trip.flight.*, trip.hotel.*, trip.car.* (hold and release; a
/// flight, hotel or car named SOLD-OUT answers sold_out), trip.charge and
/// trip.refund (card 4000000000000002 is declined), trip.remind and
/// trip.book (which books on the order's `approved` signal). Its state is
/// in this process's memory.
#[derive(Parser, Debug)]
#[command(name = "trip-worker", version)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    worker_main("trip-worker", args.worker, |_nats, builder| async move {
        let svc = Arc::new(TripService::default());
        Ok(serve_trip(&svc, builder))
    })
}
