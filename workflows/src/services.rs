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

/// Every service subject above.
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
    }
}
