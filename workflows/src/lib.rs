//! The order domain: the [`Order`] payload, the `order` workflow, the
//! names of the services it asks for ([`services`]), and the generator of
//! example order flows; and the trip domain ([`trip`]), whose workflow
//! waits for a traveller's approval.
//!
//! The JSON form of [`Order`] is a public interface (example files, clients
//! in other languages):
//!
//! ```json
//! {"customer": "c-17", "items": [{"sku": "SKU-1", "qty": 2, "unit_price_cents": 1299}],
//!  "payment": {"card": "4242424242424242"}, "ship_to": {"country": "DE", "zip": "10115"}}
//! ```

use std::borrow::Cow;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use waybill::{Backoff, DefinitionError, InvalidPayload, Registry, Then, Workflow, WorkflowPayload};

pub mod samples;
pub mod services;
pub mod trip;

/// The name of the order workflow.
pub const ORDER: &str = "order";

/// One order: who, what, how paid, where to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    pub customer: String,
    pub items: Vec<Item>,
    pub payment: PaymentInfo,
    pub ship_to: Address,
}

/// One line of an order. Quantities and prices are signed on the wire so a
/// negative one is refused with a message naming it, not a parse error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub sku: String,
    pub qty: i64,
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentInfo {
    pub card: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Address {
    pub country: String,
    pub zip: String,
}

/// Why an order is refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidOrder {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> InvalidOrder {
    InvalidOrder {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Σ quantity × unit price over (quantity, unit price) lines, without
/// overflowing.
fn total(lines: impl Iterator<Item = (i64, i64)>) -> Result<i64, InvalidOrder> {
    lines
        .map(|(qty, price)| qty.checked_mul(price))
        .try_fold(0i64, |sum, line| line.and_then(|l| sum.checked_add(l)))
        .ok_or_else(|| invalid("items", "the order total does not fit in 64 bits"))
}

impl Order {
    /// Checks the order's business rules.
    pub fn check(&self) -> Result<(), InvalidOrder> {
        if self.customer.trim().is_empty() {
            return Err(invalid("customer", "must not be empty"));
        }
        if self.items.is_empty() {
            return Err(invalid("items", "an order needs at least one item"));
        }
        for (i, item) in self.items.iter().enumerate() {
            if item.sku.trim().is_empty() {
                return Err(invalid(format!("items[{i}].sku"), "must not be empty"));
            }
            if item.qty < 1 {
                return Err(invalid(
                    format!("items[{i}].qty"),
                    format!("must be at least 1, got {}", item.qty),
                ));
            }
            if item.unit_price_cents < 0 {
                return Err(invalid(
                    format!("items[{i}].unit_price_cents"),
                    format!("must not be negative, got {}", item.unit_price_cents),
                ));
            }
        }
        if self.payment.card.trim().is_empty() {
            return Err(invalid("payment.card", "must not be empty"));
        }
        if self.ship_to.country.trim().is_empty() {
            return Err(invalid("ship_to.country", "must not be empty"));
        }
        self.total_cents()?;
        Ok(())
    }

    /// Σ quantity × unit price, in cents.
    pub fn total_cents(&self) -> Result<i64, InvalidOrder> {
        total(self.items.iter().map(|i| (i.qty, i.unit_price_cents)))
    }
}

/// A borrowed view of an encoded [`Order`]: the same fields, read without
/// copying strings. Handlers that only read an order use it
/// (`payload.decode_borrowed::<OrderView>()`); the field order matches
/// [`Order`], which a test checks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OrderView<'a> {
    #[serde(borrow)]
    pub customer: Cow<'a, str>,
    #[serde(borrow)]
    pub items: Vec<ItemView<'a>>,
    #[serde(borrow)]
    pub payment: PaymentView<'a>,
    #[serde(borrow)]
    pub ship_to: AddressView<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ItemView<'a> {
    #[serde(borrow)]
    pub sku: Cow<'a, str>,
    pub qty: i64,
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PaymentView<'a> {
    #[serde(borrow)]
    pub card: Cow<'a, str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AddressView<'a> {
    #[serde(borrow)]
    pub country: Cow<'a, str>,
    #[serde(borrow)]
    pub zip: Cow<'a, str>,
}

impl OrderView<'_> {
    /// Σ quantity × unit price, in cents.
    pub fn total_cents(&self) -> Result<i64, InvalidOrder> {
        total(self.items.iter().map(|i| (i.qty, i.unit_price_cents)))
    }
}

impl WorkflowPayload for Order {
    fn validate(&self) -> Result<(), InvalidPayload> {
        Ok(self.check()?)
    }
}

impl From<InvalidOrder> for InvalidPayload {
    fn from(e: InvalidOrder) -> Self {
        InvalidPayload {
            field: e.field,
            problem: e.problem,
        }
    }
}

/// The `order` workflow, version 1: charge the card (a gateway call, given
/// 10 s), reserve the stock (10 s: a run that dies holds the order's
/// reservation for that long, plus a margin), ship. Each step is tried up
/// to 8 times, 50 ms doubling to 3.2 s apart: about 6 s in all, enough to
/// ride out a NATS leader election under the services' stores. A declined card fails the order; missing
/// stock or a failed shipment undoes what was done (release, refund) and
/// ends it `compensated`.
pub fn order_v1() -> Result<Workflow, DefinitionError> {
    Workflow::builder(ORDER, 1)
        .step("charge", services::PAYMENT_CHARGE)
        .compensate(services::PAYMENT_REFUND)
        .retry(Backoff::exponential(8, Duration::from_millis(50)))
        .timeout(Duration::from_secs(10))
        .on("declined", Then::Fail)
        .step("reserve", services::INVENTORY_RESERVE)
        .compensate(services::INVENTORY_RELEASE)
        .retry(Backoff::exponential(8, Duration::from_millis(50)))
        .timeout(Duration::from_secs(10))
        .on("out_of_stock", Then::Fail)
        .step("ship", services::SHIPPING_DISPATCH)
        .retry(Backoff::exponential(8, Duration::from_millis(50)))
        .timeout(Duration::from_secs(30))
        .build()
}

/// The name of the order workflow with a cooling-off period.
pub const COOLING_OFF: &str = "cooling_off";

/// How long [`cooling_off_v1`] holds an order before charging it: short,
/// so that its example flows replay in seconds. A shop's would be days;
/// nothing else changes, since a waiting order holds no worker.
pub const COOLING_OFF_PERIOD: Duration = Duration::from_secs(2);

/// The `cooling_off` workflow, version 1: the same services as `order`,
/// in another order and with a wait. The stock is reserved at once; the
/// card is charged only once the cooling-off period has passed, during
/// which the customer may cancel (`waybill cancel`): the reservation is
/// released and nothing is charged. Then ship. A declined card releases
/// the stock and ends the order `compensated`; missing stock fails it
/// with nothing to undo.
pub fn cooling_off_v1() -> Result<Workflow, DefinitionError> {
    Workflow::builder(COOLING_OFF, 1)
        .step("reserve", services::INVENTORY_RESERVE)
        .compensate(services::INVENTORY_RELEASE)
        .retry(Backoff::exponential(8, Duration::from_millis(50)))
        .timeout(Duration::from_secs(10))
        .on("out_of_stock", Then::Fail)
        .step("charge", services::PAYMENT_CHARGE)
        .delay(COOLING_OFF_PERIOD)
        .compensate(services::PAYMENT_REFUND)
        .retry(Backoff::exponential(8, Duration::from_millis(50)))
        .timeout(Duration::from_secs(10))
        .on("declined", Then::Fail)
        .step("ship", services::SHIPPING_DISPATCH)
        .retry(Backoff::exponential(8, Duration::from_millis(50)))
        .timeout(Duration::from_secs(30))
        .build()
}

/// A registry holding every workflow this crate defines, current versions
/// last.
pub fn registry() -> Result<Registry, DefinitionError> {
    let mut r = Registry::new();
    r.register::<Order>(order_v1()?);
    r.register::<Order>(cooling_off_v1()?);
    r.register::<trip::Trip>(trip::trip_v1()?);
    r.register::<trip::Trip>(trip::trip_v2()?);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"customer": "c-17", "items": [{"sku": "SKU-1", "qty": 2, "unit_price_cents": 1299}],
 "payment": {"card": "4242424242424242"}, "ship_to": {"country": "DE", "zip": "10115"}}"#;

    #[test]
    fn the_documented_json_form_parses_and_round_trips() {
        let o: Order = serde_json::from_str(EXAMPLE).unwrap();
        assert_eq!(o.total_cents().unwrap(), 2598);
        o.check().unwrap();
        let back: serde_json::Value = serde_json::to_value(&o).unwrap();
        let want: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        assert_eq!(back, want);
    }

    #[test]
    fn the_borrowed_view_reads_both_encodings() {
        let o: Order = serde_json::from_str(EXAMPLE).unwrap();
        for p in [
            waybill::Payload::postcard(&o).unwrap(),
            waybill::Payload::json(&o).unwrap(),
        ] {
            let v: OrderView = p.decode_borrowed().unwrap();
            assert_eq!(v.customer, o.customer);
            assert_eq!(v.items.len(), 1);
            assert_eq!(v.items[0].sku, "SKU-1");
            assert_eq!(v.total_cents().unwrap(), o.total_cents().unwrap());
            assert_eq!(v.payment.card, o.payment.card);
            assert_eq!((v.ship_to.country.as_ref(), v.ship_to.zip.as_ref()), ("DE", "10115"));
        }
    }

    #[test]
    fn invalid_orders_name_the_field() {
        let base: Order = serde_json::from_str(EXAMPLE).unwrap();
        type Change = Box<dyn Fn(&mut Order)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|o| o.items.clear()), "items: an order needs at least one item"),
            (
                Box::new(|o| o.items[0].qty = 0),
                "items[0].qty: must be at least 1, got 0",
            ),
            (
                Box::new(|o| o.items[0].qty = -3),
                "items[0].qty: must be at least 1, got -3",
            ),
            (
                Box::new(|o| o.items[0].unit_price_cents = -1),
                "items[0].unit_price_cents: must not be negative, got -1",
            ),
            (Box::new(|o| o.customer.clear()), "customer: must not be empty"),
            (Box::new(|o| o.payment.card.clear()), "payment.card: must not be empty"),
            (Box::new(|o| o.items[0].sku.clear()), "items[0].sku: must not be empty"),
            (
                Box::new(|o| {
                    o.items[0].qty = i64::MAX;
                    o.items[0].unit_price_cents = 2;
                }),
                "items: the order total does not fit in 64 bits",
            ),
        ];
        for (change, want) in cases {
            let mut o = base.clone();
            change(&mut o);
            assert_eq!(o.check().unwrap_err().to_string(), want);
            assert_eq!(o.validate().unwrap_err().to_string(), want);
        }
    }

    #[test]
    fn registry_refuses_bad_json_with_clear_errors() {
        let r = registry().unwrap();
        let e = r.prepare_json("order", br#"{"customer":"c"}"#).unwrap_err().to_string();
        assert!(e.contains("missing field `items`"), "{e}");
        let e = r
            .prepare_json("order", EXAMPLE.replace("\"qty\": 2", "\"qty\": -2").as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("items[0].qty"), "{e}");
        let e = r.prepare_json("order", EXAMPLE.replace("c-17", "c-17\", \"extra\": \"1").as_bytes());
        assert!(e.unwrap_err().to_string().contains("unknown field `extra`"));
        let e = r.prepare_json("refund", EXAMPLE.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("unknown workflow `refund`"));
        let e = r
            .prepare_json("order", br#"{"customer":"c","items":"many"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid type"), "{e}");
        assert!(r.prepare_json("order", EXAMPLE.as_bytes()).is_ok());
    }
}
