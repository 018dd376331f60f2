//! Example order flows: deterministic generators of orders whose terminal
//! status is known in advance from the reference services' rules (see the
//! README): a card ending `0002` is declined, `0119` fails twice at the
//! gateway then succeeds, `OOS-` SKUs and `SKU-LIMITED` beyond its stock
//! cannot be reserved, and country `XX` cannot be shipped to.
//!
//! The outcome of every generated order is independent of the order in which
//! orders run: no generated order can take stock another one needs.

use serde_json::{Map, Value};
use waybill::Status;

use crate::{Address, Item, Order, PaymentInfo};

/// A card that is charged.
pub const CARD_OK: &str = "4242424242424242";
/// A card that is declined.
pub const CARD_DECLINED: &str = "4000000000000002";
/// A card whose first two charges fail at the gateway.
pub const CARD_FLAKY: &str = "4000000000000119";
/// A listed SKU with little stock (see `examples/stock.json`): generated
/// orders always ask for more than there is.
pub const SKU_LIMITED: &str = "SKU-LIMITED";
/// Stock of [`SKU_LIMITED`] in `examples/stock.json`.
pub const SKU_LIMITED_STOCK: i64 = 10;

/// The kinds of example flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Charged, reserved, shipped: `completed`.
    Happy,
    /// Card declined: `failed`, nothing to undo.
    Declined,
    /// Not enough stock: refunded, `compensated`.
    OutOfStock,
    /// Cannot ship: released and refunded, `compensated`.
    Unshippable,
    /// Two gateway errors, then charged: `completed`.
    Transient,
}

impl Kind {
    pub fn expect(self) -> Status {
        match self {
            Kind::Happy | Kind::Transient => Status::Completed,
            Kind::Declined => Status::Failed,
            Kind::OutOfStock | Kind::Unshippable => Status::Compensated,
        }
    }
}

/// An order and the terminal status it must reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub order: Order,
    pub expect: Status,
}

impl Sample {
    /// The JSON Lines form: the order's JSON with an `expect` field.
    pub fn to_line(&self) -> String {
        let mut map = Map::new();
        map.insert("expect".into(), Value::String(self.expect.to_string()));
        if let Ok(Value::Object(order)) = serde_json::to_value(&self.order) {
            map.extend(order);
        }
        Value::Object(map).to_string()
    }
}

const COUNTRIES: [(&str, &str); 6] = [
    ("DE", "10115"),
    ("FR", "75001"),
    ("US", "94105"),
    ("NL", "1012"),
    ("JP", "100-0001"),
    ("GB", "SW1A 1AA"),
];

fn base(rng: &mut fastrand::Rng, n: usize) -> Order {
    let lines = rng.usize(1..=3);
    let items = (0..lines)
        .map(|_| Item {
            sku: format!("SKU-{}", rng.u32(1..=40)),
            qty: rng.i64(1..=5),
            unit_price_cents: rng.i64(99..=25_000),
        })
        .collect();
    let (country, zip) = COUNTRIES[rng.usize(..COUNTRIES.len())];
    Order {
        customer: format!("c-{}", n + 1),
        items,
        payment: PaymentInfo { card: CARD_OK.into() },
        ship_to: Address {
            country: country.into(),
            zip: zip.into(),
        },
    }
}

/// One order of `kind`; `n` numbers the customer.
pub fn one(kind: Kind, rng: &mut fastrand::Rng, n: usize) -> Sample {
    let mut order = base(rng, n);
    match kind {
        Kind::Happy => {}
        Kind::Declined => order.payment.card = CARD_DECLINED.into(),
        Kind::Transient => order.payment.card = CARD_FLAKY.into(),
        Kind::Unshippable => {
            order.ship_to = Address {
                country: "XX".into(),
                zip: "00000".into(),
            }
        }
        Kind::OutOfStock => {
            let item = if rng.bool() {
                Item {
                    sku: format!("OOS-{}", rng.u32(1..=9)),
                    qty: rng.i64(1..=3),
                    unit_price_cents: 500,
                }
            } else {
                Item {
                    sku: SKU_LIMITED.into(),
                    qty: SKU_LIMITED_STOCK + rng.i64(1..=5),
                    unit_price_cents: 700,
                }
            };
            // Somewhere among the other lines: all or nothing is reserved.
            let at = rng.usize(..=order.items.len());
            order.items.insert(at, item);
        }
    }
    Sample {
        order,
        expect: kind.expect(),
    }
}

/// `count` orders of one kind.
pub fn of_kind(kind: Kind, count: usize, seed: u64) -> Vec<Sample> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count).map(|n| one(kind, &mut rng, n)).collect()
}

/// `count` orders of every kind mixed: about 70 % happy, the rest split
/// between declined, out of stock, unshippable and transient failures.
pub fn mixed(count: usize, seed: u64) -> Vec<Sample> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count)
        .map(|n| {
            let kind = match rng.u32(0..100) {
                0..70 => Kind::Happy,
                70..78 => Kind::Declined,
                78..86 => Kind::OutOfStock,
                86..93 => Kind::Unshippable,
                _ => Kind::Transient,
            };
            one(kind, &mut rng, n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_orders_are_valid_and_deterministic() {
        let a = mixed(500, 7);
        assert_eq!(a, mixed(500, 7));
        for s in &a {
            s.order.check().unwrap();
        }
        for st in [Status::Completed, Status::Failed, Status::Compensated] {
            assert!(a.iter().any(|s| s.expect == st), "no {st} order in the mix");
        }
    }

    #[test]
    fn lines_carry_expect_and_the_order() {
        let s = &of_kind(Kind::Declined, 1, 1)[0];
        let v: Value = serde_json::from_str(&s.to_line()).unwrap();
        assert_eq!(v["expect"], "failed");
        assert_eq!(v["payment"]["card"], CARD_DECLINED);
    }
}
