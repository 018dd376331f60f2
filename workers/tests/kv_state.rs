//! The services' state in NATS KV, against a throwaway nats-server: charges
//! and reservations happen once however many runs race, and stock is never
//! oversold.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use waybill::transport::nats::{Nats, NatsConfig};
use waybill::OrderId;
use waybill_testkit::NatsServer;
use waybill_workers::services::kv::{self, KvLedger, KvStock};
use waybill_workers::services::{Ledger, Reservation, Run, StockError, StockStore};

const WINDOW: Duration = Duration::from_secs(10);
const RUN: Run = Run { window: WINDOW };

async fn nats(server: &NatsServer) -> Nats {
    let n = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    kv::setup_buckets(&n, 1).await.unwrap();
    n
}

/// Retries while another run holds the order, as the runtime would.
async fn reserve(stock: &KvStock, order: OrderId, lines: &BTreeMap<String, i64>) -> Reservation {
    for _ in 0..200 {
        match stock.reserve(order, lines, RUN).await {
            Ok(r) => return r,
            Err(StockError::Busy(_)) => tokio::task::yield_now().await,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("still busy after 200 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_charges_and_refunds_happen_once() {
    let server = NatsServer::start();
    let n = nats(&server).await;
    let (a, b) = (KvLedger::open(&n).await.unwrap(), KvLedger::open(&n).await.unwrap());
    let id = OrderId::new();
    let (x, y) = tokio::join!(a.charge(id, 500), b.charge(id, 500));
    assert_eq!(x.unwrap(), y.unwrap());
    let (x, y) = tokio::join!(a.refund(id), b.refund(id));
    assert!(x.unwrap().unwrap().refunded && y.unwrap().unwrap().refunded);
    let e = a.entry(id).await.unwrap().unwrap();
    assert_eq!((e.amount_cents, e.charged, e.refunded), (500, true, true));
    assert_eq!(a.entry(OrderId::new()).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_of_one_reservation_take_the_stock_once() {
    let server = NatsServer::start();
    let n = nats(&server).await;
    let stock = KvStock::open(&n, HashMap::new()).await.unwrap();
    let lines = BTreeMap::from([("SKU-A".to_owned(), 3), ("SKU-B".to_owned(), 2)]);
    for _ in 0..10 {
        let id = OrderId::new();
        let (x, y) = tokio::join!(reserve(&stock, id, &lines), reserve(&stock, id, &lines));
        assert_eq!((x, y), (Reservation::Reserved, Reservation::Reserved));
    }
    let (a, pending_a) = stock.level_of("SKU-A").await.unwrap();
    let (b, pending_b) = stock.level_of("SKU-B").await.unwrap();
    assert_eq!((a.reserved, b.reserved), (30, 20));
    assert_eq!((a.available, b.available), (1_000_000 - 30, 1_000_000 - 20));
    assert_eq!((pending_a, pending_b), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_is_never_oversold_and_short_orders_take_nothing() {
    let server = NatsServer::start();
    let n = nats(&server).await;
    kv::seed_stock(&n, &BTreeMap::from([("SKU-LIMITED".to_owned(), 10)]))
        .await
        .unwrap();
    let stock = KvStock::open(&n, HashMap::new()).await.unwrap();
    let one = BTreeMap::from([("SKU-LIMITED".to_owned(), 1), ("SKU-X".to_owned(), 1)]);
    let results = futures::future::join_all((0..16).map(|_| reserve(&stock, OrderId::new(), &one))).await;
    let reserved = results.iter().filter(|r| **r == Reservation::Reserved).count();
    assert_eq!(reserved, 10, "{results:?}");
    let (limited, _) = stock.level_of("SKU-LIMITED").await.unwrap();
    assert_eq!((limited.available, limited.reserved), (0, 10));
    // The short orders' other line was undone: SKU-X holds only the ten.
    let (x, pending) = stock.level_of("SKU-X").await.unwrap();
    assert_eq!((x.reserved, pending), (10, 0));

    // A released reservation returns its stock, once.
    let id = OrderId::new();
    let two = BTreeMap::from([("SKU-Y".to_owned(), 2)]);
    assert_eq!(reserve(&stock, id, &two).await, Reservation::Reserved);
    let release = Run { window: WINDOW };
    assert!(stock.release(id, release).await.unwrap());
    assert!(!stock.release(id, release).await.unwrap());
    let (y, _) = stock.level_of("SKU-Y").await.unwrap();
    assert_eq!((y.available, y.reserved), (1_000_000, 0));
}

/// A reservation whose step ran out of attempts part-way: its run died
/// after changing one SKU (the marker says so) and before saving the
/// order's record, holding the order's lease. Until the lease lapses no
/// other run acts; then the compensation gives back what was taken and
/// closes the record, and a late run of the step takes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_a_half_made_reservation_gives_back_what_it_took() {
    let server = NatsServer::start();
    let n = nats(&server).await;
    let stock = KvStock::open(&n, HashMap::new()).await.unwrap();
    let id = OrderId::new();
    let lines = BTreeMap::from([("SKU-H1".to_owned(), 3), ("SKU-H2".to_owned(), 2)]);
    let orders = n.key_value(kv::RESERVATIONS).await.unwrap();
    let skus = n.key_value(kv::INVENTORY).await.unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let record = |until_ms: u64| {
        let r = serde_json::json!({
            "lines": {"SKU-H1": 3, "SKU-H2": 2}, "state": "reserving",
            "applied": ["SKU-H1"], "returned": [],
            "lease": {"run": "dead", "until_ms": until_ms}
        });
        bytes::Bytes::from(serde_json::to_vec(&r).unwrap())
    };
    let level = |reserved: i64, marker: Option<i64>| {
        let mut v = serde_json::json!({"available": 1_000_000 - reserved, "reserved": reserved});
        if let Some(q) = marker {
            v["pending"] = serde_json::json!({format!("{id}:reserve"): q});
        }
        bytes::Bytes::from(serde_json::to_vec(&v).unwrap())
    };
    // SKU-H1 reserved and recorded; SKU-H2 changed, its record lost.
    orders.put(id.to_string(), record(now_ms + 60_000)).await.unwrap();
    skus.put("SKU-H1", level(3, None)).await.unwrap();
    skus.put("SKU-H2", level(2, Some(2))).await.unwrap();

    // While the dead run's lease holds, nobody acts.
    let again = stock.reserve(id, &lines, RUN).await;
    assert!(matches!(again, Err(StockError::Busy(_))), "{again:?}");
    let early = stock.release(id, RUN).await;
    assert!(matches!(early, Err(StockError::Busy(_))), "{early:?}");

    // Once it has lapsed, the compensation gives everything back.
    orders.put(id.to_string(), record(now_ms - 1)).await.unwrap();
    assert!(stock.release(id, RUN).await.unwrap());
    for sku in ["SKU-H1", "SKU-H2"] {
        let (l, pending) = stock.level_of(sku).await.unwrap();
        assert_eq!((l.available, l.reserved, pending), (1_000_000, 0, 0), "{sku}");
    }
    // A late run of the step finds the record closed and takes nothing.
    stock.reserve(id, &lines, RUN).await.unwrap();
    let (l, _) = stock.level_of("SKU-H2").await.unwrap();
    assert_eq!(l.reserved, 0);
    assert!(!stock.release(id, RUN).await.unwrap());
}

/// A reservation whose every attempt failed before it wrote anything is
/// compensated all the same: the release finds nothing, and closes the
/// order, so a late redelivery of the reservation takes nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_before_any_reservation_closes_the_order() {
    let server = NatsServer::start();
    let n = nats(&server).await;
    let stock = KvStock::open(&n, HashMap::new()).await.unwrap();
    let id = OrderId::new();
    assert!(!stock.release(id, RUN).await.unwrap());
    let lines = BTreeMap::from([("SKU-L".to_owned(), 4)]);
    stock.reserve(id, &lines, RUN).await.unwrap();
    let (l, pending) = stock.level_of("SKU-L").await.unwrap();
    assert_eq!((l.reserved, pending), (0, 0));
}
