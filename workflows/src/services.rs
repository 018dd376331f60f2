//! The service subjects of the order domain, named once: the workflow
//! definitions ask for them and the workers serve them, so a name that does
//! not match is a compile error, not an order that stalls at run time.

/// Charges an order's card.
pub const PAYMENT_CHARGE: &str = "payment.charge";
/// Refunds a charge (the compensation of [`PAYMENT_CHARGE`]).
pub const PAYMENT_REFUND: &str = "payment.refund";
/// Reserves an order's lines, all or none.
pub const INVENTORY_RESERVE: &str = "inventory.reserve";
/// Releases a reservation (the compensation of [`INVENTORY_RESERVE`]).
pub const INVENTORY_RELEASE: &str = "inventory.release";
/// Ships an order.
pub const SHIPPING_DISPATCH: &str = "shipping.dispatch";

/// Holds a trip's flight.
pub const TRIP_FLIGHT_HOLD: &str = "trip.flight.hold";
/// Gives a flight hold back (the compensation of [`TRIP_FLIGHT_HOLD`]).
pub const TRIP_FLIGHT_RELEASE: &str = "trip.flight.release";
/// Holds a trip's hotel room.
pub const TRIP_HOTEL_HOLD: &str = "trip.hotel.hold";
/// Gives a hotel hold back.
pub const TRIP_HOTEL_RELEASE: &str = "trip.hotel.release";
/// Prices a trip before anything is held.
pub const TRIP_QUOTE: &str = "trip.quote";
/// Holds a trip's car (at the desk in town).
pub const TRIP_CAR_HOLD: &str = "trip.car.hold";
/// Holds a trip's car at the airport's desk.
pub const TRIP_AIRPORT_CAR_HOLD: &str = "trip.airport_car.hold";
/// Gives an airport car hold back.
pub const TRIP_AIRPORT_CAR_RELEASE: &str = "trip.airport_car.release";
/// Gives a car hold back.
pub const TRIP_CAR_RELEASE: &str = "trip.car.release";
/// Charges a trip's card.
pub const TRIP_CHARGE: &str = "trip.charge";
/// Refunds a trip's charge.
pub const TRIP_REFUND: &str = "trip.refund";
/// Reminds the traveller to approve the trip.
pub const TRIP_REMIND: &str = "trip.remind";
/// Books every hold of an approved trip.
pub const TRIP_BOOK: &str = "trip.book";

/// Every service subject of the trip workflow.
pub const TRIP_ALL: [&str; 13] = [
    TRIP_QUOTE,
    TRIP_AIRPORT_CAR_HOLD,
    TRIP_AIRPORT_CAR_RELEASE,
    TRIP_FLIGHT_HOLD,
    TRIP_FLIGHT_RELEASE,
    TRIP_HOTEL_HOLD,
    TRIP_HOTEL_RELEASE,
    TRIP_CAR_HOLD,
    TRIP_CAR_RELEASE,
    TRIP_CHARGE,
    TRIP_REFUND,
    TRIP_REMIND,
    TRIP_BOOK,
];

/// Every service subject of the order workflows.
pub const ALL: [&str; 5] = [
    PAYMENT_CHARGE,
    PAYMENT_REFUND,
    INVENTORY_RESERVE,
    INVENTORY_RELEASE,
    SHIPPING_DISPATCH,
];

#[cfg(test)]
mod tests {
    use waybill::ServiceSubject;

    #[test]
    fn every_name_is_a_valid_subject_and_the_order_workflow_uses_them_all() {
        let mut named: Vec<ServiceSubject> = super::ALL.iter().map(|s| ServiceSubject::new(s).unwrap()).collect();
        let mut used = crate::order_v1().unwrap().services();
        named.sort();
        used.sort();
        assert_eq!(named, used);
        let mut named: Vec<ServiceSubject> = super::TRIP_ALL
            .iter()
            .map(|s| ServiceSubject::new(s).unwrap())
            .collect();
        let mut used = crate::trip::trip_v1().unwrap().services();
        used.extend(crate::trip::trip_v2().unwrap().services());
        named.sort();
        used.sort();
        used.dedup();
        assert_eq!(named, used);
    }
}
