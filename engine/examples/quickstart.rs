//! Waybill in one file: define a workflow, write its step handlers, run them
//! on the embedded transport (no server), start orders and read their
//! histories.
//!
//! `cargo run -p waybill --example quickstart`

use std::time::Duration;

use serde::{Deserialize, Serialize};
use waybill::transport::Embedded;
use waybill::{
    Backoff, Client, InvalidPayload, Payload, Registry, StepContext, StepError, StepOutput, Then, Worker, Workflow,
    WorkflowPayload,
};

/// The payload: whatever your workflow carries. It travels inside the
/// document; the engine never looks into it.
#[derive(Debug, Serialize, Deserialize)]
struct Trip {
    traveller: String,
    seats: u32,
}

impl WorkflowPayload for Trip {
    /// Refused at start, with a message naming the field.
    fn validate(&self) -> Result<(), InvalidPayload> {
        if self.seats == 0 {
            return Err(InvalidPayload::new("seats", "must be at least 1"));
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The route. Each step names a service subject; a step that needs
    //    undoing names its compensation. `build()` checks the route.
    let trip = Workflow::builder("trip", 1)
        .step("hold", "seats.hold")
        .compensate("seats.release")
        .on("sold_out", Then::Fail)
        .step("pay", "payments.charge")
        .compensate("payments.refund")
        .retry(Backoff::exponential(4, Duration::from_millis(10)))
        .step("ticket", "tickets.issue")
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut registry = Registry::new();
    registry.register::<Trip>(trip);

    // 2. Step handlers: async functions of the step's context and the payload.
    //    Business outcomes (`sold_out`) are not errors; the route maps them.
    let hold = |_ctx: StepContext, p: Payload| async move {
        let trip: Trip = p.decode()?;
        Ok(if trip.seats > 4 {
            StepOutput::outcome("sold_out")
        } else {
            StepOutput::ok()
        })
    };
    let pay = |ctx: StepContext, p: Payload| async move {
        let trip: Trip = p.decode()?;
        if trip.traveller == "flaky" && ctx.attempt < 3 {
            // Retried with the step's backoff, with the same idempotency key.
            return Err(StepError::transient("card gateway timed out"));
        }
        Ok(StepOutput::ok().with_detail(format!("charged {} (key {})", trip.seats * 100, ctx.idempotency_key())))
    };
    let ticket = |_ctx: StepContext, p: Payload| async move {
        let trip: Trip = p.decode()?;
        if trip.traveller == "nobody" {
            return Err(StepError::permanent("no such traveller"));
        }
        Ok(StepOutput::ok().with_detail(format!("ticket for {}", trip.traveller)))
    };
    let undo = |_ctx: StepContext, _p: Payload| async move { Ok(StepOutput::ok()) };

    // 3. A worker serving the services, and a client, on one embedded
    //    transport. On NATS the same code runs across many hosts.
    let transport = Embedded::new();
    let worker = Worker::builder(transport.clone())
        .serve("seats.hold", hold)
        .serve("seats.release", undo)
        .serve("payments.charge", pay)
        .serve("payments.refund", undo)
        .serve("tickets.issue", ticket)
        .start()
        .await?;
    let client = Client::connect(transport).await?;

    // 4. Start orders and follow each to its end.
    for (who, seats) in [("ada", 2), ("flaky", 1), ("crowd", 9), ("nobody", 1)] {
        let (workflow, payload) = registry.prepare(
            "trip",
            &Trip {
                traveller: who.into(),
                seats,
            },
        )?;
        let id = client.start(&workflow, payload).await?;
        let doc = tokio::time::timeout(Duration::from_secs(10), client.wait(id)).await??;
        println!("{who}: {}", doc.status);
        for r in &doc.history {
            println!(
                "    {:<7} {:<12} attempt {}  {:?}  {}",
                r.step.as_str(),
                format!("{:?}", r.kind).to_lowercase(),
                r.attempt,
                r.result,
                r.detail.as_deref().unwrap_or("")
            );
        }
    }
    let refused = registry.prepare(
        "trip",
        &Trip {
            traveller: "x".into(),
            seats: 0,
        },
    );
    if let Err(e) = refused {
        println!("a trip with no seats: {e}");
    }

    worker.shutdown().await;
    client.close().await;
    Ok(())
}
