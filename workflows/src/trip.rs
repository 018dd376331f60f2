//! The trip domain: the [`Trip`] payload and the `trip` workflow, which
//! holds a flight, a hotel and a car, charges the traveller, reminds them
//! after a while, and books only once they approve (a signal), undoing
//! every hold when anything fails or the approval does not come in time.
//!
//! The JSON form of [`Trip`] is a public interface (example files):
//!
//! ```json
//! {"traveller": "ana", "flight": "BER-LIS", "hotel": "Lisbon Central",
//!  "car": "compact", "card": "4242424242424242", "price_cents": 123400}
//! ```
//!
//! The reference services answer `sold_out` for a flight, hotel or car
//! named [`SOLD_OUT`], and decline the card the payment service declines.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use waybill::{Backoff, DefinitionError, InvalidPayload, Join, Then, Workflow, WorkflowBuilder, WorkflowPayload};

use crate::services;

/// The name of the trip workflow.
pub const TRIP: &str = "trip";

/// What the reference services call a flight, hotel or car there is none
/// of: its hold answers `sold_out`.
pub const SOLD_OUT: &str = "SOLD-OUT";

/// What the airport's car desk calls a car only the desk in town has:
/// its hold answers `sold_out` there (the town desk holds it).
pub const TOWN_ONLY: &str = "TOWN-ONLY";

/// The signal the trip waits for before it books: the traveller's
/// approval (its JSON is kept in the order, and the booking reads it).
pub const APPROVED: &str = "approved";

/// How long after the charge the traveller is reminded: short, so that
/// the example flows replay in seconds (a travel agent's would be a day).
pub const REMINDER_AFTER: Duration = Duration::from_secs(1);

/// How long after the reminder the trip waits for the approval before it
/// gives every hold back and refunds the charge (a travel agent's would be
/// two days).
pub const APPROVAL_DEADLINE: Duration = Duration::from_secs(3);

/// One trip to hold, charge and book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trip {
    pub traveller: String,
    pub flight: String,
    pub hotel: String,
    pub car: String,
    pub card: String,
    pub price_cents: i64,
}

impl WorkflowPayload for Trip {
    fn validate(&self) -> Result<(), InvalidPayload> {
        let invalid = |field: &str, problem: String| InvalidPayload {
            field: field.to_owned(),
            problem,
        };
        for (field, value) in [
            ("traveller", &self.traveller),
            ("flight", &self.flight),
            ("hotel", &self.hotel),
            ("car", &self.car),
            ("card", &self.card),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(field, "must not be empty".into()));
            }
        }
        if self.price_cents < 0 {
            return Err(invalid(
                "price_cents",
                format!("must not be negative, got {}", self.price_cents),
            ));
        }
        Ok(())
    }
}

/// The `trip` workflow, version 1: hold the flight, the hotel and the car
/// (each undone by its release; one `sold_out` fails the trip, giving back
/// the holds made), charge the card (refunded if a later step fails; a
/// declined card fails the trip), remind the traveller [`REMINDER_AFTER`]
/// later, then wait for their approval ([`APPROVED`]) at most
/// [`APPROVAL_DEADLINE`]: with it, book; without it, give everything back
/// (the order ends `compensated`). A cancel at any point before the
/// booking does the same and ends it `cancelled`.
pub fn trip_v1() -> Result<Workflow, DefinitionError> {
    let b = Workflow::builder(TRIP, 1);
    let b = hold(
        b,
        "hold_flight",
        services::TRIP_FLIGHT_HOLD,
        services::TRIP_FLIGHT_RELEASE,
    );
    let b = hold(b, "hold_hotel", services::TRIP_HOTEL_HOLD, services::TRIP_HOTEL_RELEASE);
    let b = hold(b, "hold_car", services::TRIP_CAR_HOLD, services::TRIP_CAR_RELEASE);
    charge_remind_book(b).build()
}

/// The `trip` workflow, version 2, the current one: prices the trip
/// (`quote`), then holds the flight and the hotel **at the same time**
/// (fork `holds`: each branch has its own copy of the trip, and the join
/// goes on when both are held), then asks the desk in town and the desk at
/// the airport for the car at the same time and takes **the first** that
/// holds one (fork `car`, `Join::first(1)`: the other is stopped, and its
/// hold given back if it made one). Then as version 1: charge, remind
/// after [`REMINDER_AFTER`], book on the traveller's approval or give
/// everything back at [`APPROVAL_DEADLINE`]. A hold that is sold out (both
/// desks, for the car) stops the other branches and undoes every hold
/// made, newest first; the trip ends `compensated`.
pub fn trip_v2() -> Result<Workflow, DefinitionError> {
    let b = limits(Workflow::builder(TRIP, 2).step("quote", services::TRIP_QUOTE));
    let b = hold(
        b.fork("holds").branch(),
        "hold_flight",
        services::TRIP_FLIGHT_HOLD,
        services::TRIP_FLIGHT_RELEASE,
    );
    let b = hold(
        b.branch(),
        "hold_hotel",
        services::TRIP_HOTEL_HOLD,
        services::TRIP_HOTEL_RELEASE,
    );
    let b = b.join(Join::all()).fork("car").branch();
    let b = hold(b, "hold_car", services::TRIP_CAR_HOLD, services::TRIP_CAR_RELEASE);
    let b = hold(
        b.branch(),
        "hold_airport_car",
        services::TRIP_AIRPORT_CAR_HOLD,
        services::TRIP_AIRPORT_CAR_RELEASE,
    );
    charge_remind_book(b.join(Join::first(1))).build()
}

/// Every trip step's tries and time limit.
fn limits(b: WorkflowBuilder) -> WorkflowBuilder {
    b.retry(Backoff::exponential(8, Duration::from_millis(50)))
        .timeout(Duration::from_secs(10))
}

/// A hold, undone by its release; `sold_out` fails the trip (or the branch
/// it is in).
fn hold(b: WorkflowBuilder, name: &str, hold: &str, release: &str) -> WorkflowBuilder {
    limits(b.step(name, hold).compensate(release)).on("sold_out", Then::Fail)
}

/// What every version does once the holds are made: charge (refunded if
/// a later step fails; a declined card fails the trip), remind after
/// [`REMINDER_AFTER`], book on the approval within [`APPROVAL_DEADLINE`].
fn charge_remind_book(b: WorkflowBuilder) -> WorkflowBuilder {
    let b = limits(
        b.step("charge", services::TRIP_CHARGE)
            .compensate(services::TRIP_REFUND),
    );
    let b = b.on("declined", Then::Fail);
    let b = limits(b.step("remind", services::TRIP_REMIND).delay(REMINDER_AFTER));
    limits(
        b.step("book", services::TRIP_BOOK)
            .await_signal(APPROVED, APPROVAL_DEADLINE)
            .on_timeout(Then::Fail),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"traveller": "ana", "flight": "BER-LIS", "hotel": "Lisbon Central",
 "car": "compact", "card": "4242424242424242", "price_cents": 123400}"#;

    #[test]
    fn the_documented_json_form_parses_and_the_workflow_builds() {
        let t: Trip = serde_json::from_str(EXAMPLE).unwrap();
        t.validate().unwrap();
        let wf = trip_v1().unwrap();
        let book = wf.route().steps.last().unwrap();
        assert_eq!(book.awaits().map(|n| n.as_str()), Some(APPROVED));
        let r = crate::registry().unwrap();
        assert!(r.prepare_json(TRIP, EXAMPLE.as_bytes()).is_ok());
        let e = r
            .prepare_json(TRIP, EXAMPLE.replace("123400", "-1").as_bytes())
            .unwrap_err();
        assert!(e.to_string().contains("price_cents: must not be negative"), "{e}");
        let e = r
            .prepare_json(TRIP, EXAMPLE.replace("\"ana\"", "\" \"").as_bytes())
            .unwrap_err();
        assert!(e.to_string().contains("traveller: must not be empty"), "{e}");
    }
}
