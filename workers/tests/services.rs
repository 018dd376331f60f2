//! The reference services' rules, and their idempotency, called directly.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, HashMap};

use waybill::{OrderId, Payload, StepContext, StepKind, WorkerId};
use waybill_workers::services::{
    tracking_number, InventoryService, Ledger, MemoryLedger, MemoryShipments, MemoryStock, PaymentService, Reservation,
    ShippingService, StockStore,
};
use waybill_workflows::samples::{CARD_DECLINED, CARD_FLAKY, CARD_OK};
use waybill_workflows::{Address, Item, Order, PaymentInfo};

fn order(card: &str, items: &[(&str, i64, i64)], country: &str) -> Order {
    Order {
        customer: "c-1".into(),
        items: items
            .iter()
            .map(|(sku, qty, price)| Item {
                sku: (*sku).into(),
                qty: *qty,
                unit_price_cents: *price,
            })
            .collect(),
        payment: PaymentInfo { card: card.into() },
        ship_to: Address {
            country: country.into(),
            zip: "1".into(),
        },
    }
}

fn ctx(id: OrderId, step: &str, attempt: u32) -> StepContext {
    StepContext {
        order_id: id,
        workflow: "order".parse().unwrap(),
        version: 1,
        step: step.parse().unwrap(),
        kind: StepKind::Forward,
        attempt,
        visit: 1,
        hop: 1,
        deadline: tokio::time::Instant::now(),
        worker: WorkerId::new("test"),
        signals: Vec::new(),
    }
}

#[tokio::test]
async fn payment_charges_once_and_refunds_once() {
    let p = PaymentService::new(MemoryLedger::default());
    let id = OrderId::new();
    let o = order(CARD_OK, &[("SKU-1", 2, 1299), ("SKU-2", 1, 500)], "DE");
    let pl = Payload::postcard(&o).unwrap();
    for _ in 0..3 {
        let out = p.charge(ctx(id, "charge", 1), pl.clone()).await.unwrap();
        assert_eq!(out, waybill::StepOutput::ok().with_detail("charged 3098 cents"));
    }
    assert_eq!(p.ledger().charges_applied(), 1);
    for _ in 0..2 {
        p.refund(ctx(id, "charge", 1), pl.clone()).await.unwrap();
    }
    assert_eq!(p.ledger().refunds_applied(), 1);
    let e = p.ledger().entry(id).await.unwrap().unwrap();
    assert_eq!((e.amount_cents, e.charged, e.refunded), (3098, true, true));
    // A refund of an order never charged changes nothing.
    p.refund(ctx(OrderId::new(), "charge", 1), pl).await.unwrap();
    assert_eq!(p.ledger().refunds_applied(), 1);
}

#[tokio::test]
async fn declined_and_flaky_cards() {
    let p = PaymentService::new(MemoryLedger::default());
    let declined = Payload::postcard(&order(CARD_DECLINED, &[("SKU-1", 1, 100)], "DE")).unwrap();
    let out = p.charge(ctx(OrderId::new(), "charge", 1), declined).await.unwrap();
    assert_eq!(
        out,
        waybill::StepOutput::outcome("declined").with_detail("card declined")
    );
    let flaky = Payload::postcard(&order(CARD_FLAKY, &[("SKU-1", 1, 100)], "DE")).unwrap();
    let id = OrderId::new();
    for attempt in 1..=2 {
        let e = p.charge(ctx(id, "charge", attempt), flaky.clone()).await.unwrap_err();
        assert!(e.is_transient());
    }
    p.charge(ctx(id, "charge", 3), flaky).await.unwrap();
    assert_eq!(p.ledger().charges_applied(), 1);
}

#[tokio::test]
async fn inventory_reserves_all_or_nothing_and_releases_once() {
    let seed = HashMap::from([("SKU-LIMITED".to_owned(), 10)]);
    let inv = InventoryService::new(MemoryStock::new(seed));
    let id = OrderId::new();
    // Enough of one line, not of the other: nothing is taken.
    let short = Payload::postcard(&order(CARD_OK, &[("SKU-9", 3, 1), ("SKU-LIMITED", 11, 1)], "DE")).unwrap();
    let out = inv.reserve(ctx(id, "reserve", 1), short).await.unwrap();
    assert_eq!(
        out,
        waybill::StepOutput::outcome("out_of_stock").with_detail("SKU-LIMITED: wanted 11, available 10")
    );
    assert_eq!(inv.stock().level("SKU-9").await.unwrap().reserved, 0);
    // OOS- SKUs have none; unlisted ones a million.
    assert_eq!(inv.stock().level("OOS-1").await.unwrap().available, 0);
    assert_eq!(inv.stock().level("SKU-77").await.unwrap().available, 1_000_000);

    let id = OrderId::new();
    let ok = Payload::postcard(&order(CARD_OK, &[("SKU-LIMITED", 4, 1), ("SKU-LIMITED", 2, 1)], "DE")).unwrap();
    for _ in 0..3 {
        inv.reserve(ctx(id, "reserve", 1), ok.clone()).await.unwrap();
    }
    let l = inv.stock().level("SKU-LIMITED").await.unwrap();
    assert_eq!(
        (l.available, l.reserved),
        (4, 6),
        "reserved once, lines of one SKU added up"
    );
    for _ in 0..2 {
        inv.release(ctx(id, "reserve", 1), ok.clone()).await.unwrap();
    }
    let l = inv.stock().level("SKU-LIMITED").await.unwrap();
    assert_eq!((l.available, l.reserved), (10, 0), "released once");
    // A redelivered reservation after the release answers as before and
    // takes nothing again.
    let lines = BTreeMap::from([("SKU-LIMITED".to_owned(), 6)]);
    assert_eq!(inv.stock().reserve(id, &lines).await.unwrap(), Reservation::Reserved);
    assert_eq!(inv.stock().level("SKU-LIMITED").await.unwrap().reserved, 0);
}

#[tokio::test]
async fn shipping_refuses_xx_and_tracks_by_order_id() {
    let s = ShippingService::new(MemoryShipments::default());
    let id = OrderId::new();
    let xx = Payload::postcard(&order(CARD_OK, &[("SKU-1", 1, 1)], "XX")).unwrap();
    let e = s.dispatch(ctx(id, "ship", 1), xx).await.unwrap_err();
    assert!(!e.is_transient());
    assert_eq!(e.to_string(), "cannot ship to country XX");
    let de = Payload::postcard(&order(CARD_OK, &[("SKU-1", 1, 1)], "DE")).unwrap();
    for _ in 0..2 {
        let out = s.dispatch(ctx(id, "ship", 1), de.clone()).await.unwrap();
        assert_eq!(out, waybill::StepOutput::ok().with_detail(tracking_number(id)));
    }
    assert_eq!(s.log().count(), 1);
    assert!(tracking_number(id).starts_with("WB") && tracking_number(id).len() == 14);
}

#[tokio::test]
async fn a_payload_that_is_not_an_order_is_a_permanent_error() {
    let p = PaymentService::new(MemoryLedger::default());
    let e = p
        .charge(ctx(OrderId::new(), "charge", 1), Payload::postcard(&42u8).unwrap())
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "{e}");
}
