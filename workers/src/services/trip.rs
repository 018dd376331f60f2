//! The trip services: holds of a flight, a hotel and a car, the charge,
//! the reminder and the booking, with their state in memory. Every handler
//! is idempotent on its step's idempotency key: a redelivered step changes
//! nothing twice, and an undoing of a hold never made changes nothing.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Deserialize;
use waybill::{OrderId, Payload, StepContext, StepError, StepOutput};
use waybill_workflows::trip::{APPROVED, SOLD_OUT, TOWN_ONLY};

/// What a trip holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hold {
    Flight,
    Hotel,
    Car,
    /// A car at the airport's desk (the `trip` workflow's version 2 asks
    /// both desks and takes the first).
    AirportCar,
}

impl Hold {
    fn name(self) -> &'static str {
        match self {
            Hold::Flight => "flight",
            Hold::Hotel => "hotel",
            Hold::Car => "car",
            Hold::AirportCar => "airport car",
        }
    }
}

/// The fields of a trip the services read (borrowed, without copies).
#[derive(Deserialize)]
struct TripView<'a> {
    traveller: &'a str,
    flight: &'a str,
    hotel: &'a str,
    car: &'a str,
    card: &'a str,
    price_cents: i64,
}

fn trip_of(payload: &Payload) -> Result<TripView<'_>, StepError> {
    Ok(payload.decode_borrowed::<TripView>()?)
}

/// The card the reference payment declines.
const DECLINED_CARD: &str = "4000000000000002";

/// What the trip services did, in memory.
#[derive(Debug, Default)]
pub struct TripService {
    state: Mutex<TripState>,
}

/// The effects, by order: a test (or a fault scenario) counts them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TripState {
    /// Holds made and not given back.
    pub holds: BTreeMap<(OrderId, Hold), String>,
    /// Every hold ever made, given back or not (a redelivery makes none).
    pub holds_made: usize,
    /// Charges not refunded, in cents.
    pub charges: BTreeMap<OrderId, i64>,
    pub refunds: usize,
    pub reminders: BTreeMap<OrderId, usize>,
    /// Trips booked, with the approval they were booked on.
    pub bookings: BTreeMap<OrderId, String>,
}

impl TripService {
    fn with<R>(&self, f: impl FnOnce(&mut TripState) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A copy of what the services did.
    pub fn state(&self) -> TripState {
        self.with(|s| s.clone())
    }

    /// `trip.<kind>.hold`: holds it, or answers `sold_out`.
    pub async fn hold(&self, kind: Hold, ctx: StepContext, payload: Payload) -> Result<StepOutput, StepError> {
        let trip = trip_of(&payload)?;
        let what = match kind {
            Hold::Flight => trip.flight,
            Hold::Hotel => trip.hotel,
            Hold::Car | Hold::AirportCar => trip.car,
        };
        if what == SOLD_OUT || (kind == Hold::AirportCar && what == TOWN_ONLY) {
            return Ok(StepOutput::outcome("sold_out").with_detail(format!("no {} left", kind.name())));
        }
        let id = self.with(|s| {
            let fresh = format!("{}-{}", kind.name(), &ctx.idempotency_key().as_str()[..8]);
            let held = s
                .holds
                .entry((ctx.order_id, kind))
                .or_insert_with(|| fresh.clone())
                .clone();
            if held == fresh {
                s.holds_made += 1;
            }
            held
        });
        Ok(StepOutput::ok().with_detail(format!("{what}: {id}")))
    }

    /// `trip.<kind>.release`: gives the hold back (none made: nothing).
    pub async fn release(&self, kind: Hold, ctx: StepContext, _payload: Payload) -> Result<StepOutput, StepError> {
        self.with(|s| s.holds.remove(&(ctx.order_id, kind)));
        Ok(StepOutput::ok())
    }

    /// `trip.quote`: prices the trip (it changes nothing).
    pub async fn quote(&self, _ctx: StepContext, payload: Payload) -> Result<StepOutput, StepError> {
        let trip = trip_of(&payload)?;
        Ok(StepOutput::ok().with_detail(format!("{} cents for {}", trip.price_cents, trip.traveller)))
    }

    /// `trip.charge`: charges the trip's price, or answers `declined`.
    pub async fn charge(&self, ctx: StepContext, payload: Payload) -> Result<StepOutput, StepError> {
        let trip = trip_of(&payload)?;
        if trip.card == DECLINED_CARD {
            return Ok(StepOutput::outcome("declined"));
        }
        let price = trip.price_cents;
        self.with(|s| {
            s.charges.entry(ctx.order_id).or_insert(price);
        });
        Ok(StepOutput::ok().with_detail(format!("charged {price} cents")))
    }

    /// `trip.refund`: refunds the charge (none made: nothing).
    pub async fn refund(&self, ctx: StepContext, _payload: Payload) -> Result<StepOutput, StepError> {
        self.with(|s| {
            if s.charges.remove(&ctx.order_id).is_some() {
                s.refunds += 1;
            }
        });
        Ok(StepOutput::ok())
    }

    /// `trip.remind`: reminds the traveller to approve.
    pub async fn remind(&self, ctx: StepContext, payload: Payload) -> Result<StepOutput, StepError> {
        let trip = trip_of(&payload)?;
        self.with(|s| *s.reminders.entry(ctx.order_id).or_default() += 1);
        Ok(StepOutput::ok().with_detail(format!("reminded {}", trip.traveller)))
    }

    /// `trip.book`: books the holds, on the approval the order received.
    pub async fn book(&self, ctx: StepContext, _payload: Payload) -> Result<StepOutput, StepError> {
        let Some(approval) = ctx.signal(APPROVED) else {
            return Err(StepError::permanent("a trip is booked only once it is approved"));
        };
        let approval = approval.to_owned();
        self.with(|s| s.bookings.entry(ctx.order_id).or_insert(approval.clone()).clone());
        Ok(StepOutput::ok().with_detail(format!("booked on {approval}")))
    }
}
