//! The services' state in NATS KV, against a throwaway nats-server: charges
//! and reservations happen once however many runs race, and stock is never
//! oversold.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, HashMap};

use waybill::transport::nats::{Nats, NatsConfig};
use waybill::OrderId;
use waybill_testkit::NatsServer;
use waybill_workers::services::kv::{self, KvLedger, KvStock};
use waybill_workers::services::{Ledger, Reservation, StockError, StockStore};

async fn nats(server: &NatsServer) -> Nats {
    let n = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    kv::setup_buckets(&n, 1).await.unwrap();
    n
}

/// Retries while another run holds the order, as the runtime would.
async fn reserve(stock: &KvStock, order: OrderId, lines: &BTreeMap<String, i64>) -> Reservation {
    for _ in 0..200 {
        match stock.reserve(order, lines).await {
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
    // Two stores are two processes: each commits its own batches.
    let (a, b) = (
        KvStock::open(&n, HashMap::new()).await.unwrap(),
        KvStock::open(&n, HashMap::new()).await.unwrap(),
    );
    let lines = BTreeMap::from([("SKU-A".to_owned(), 3), ("SKU-B".to_owned(), 2)]);
    for _ in 0..10 {
        let id = OrderId::new();
        let (x, y, z) = tokio::join!(
            reserve(&a, id, &lines),
            reserve(&b, id, &lines),
            reserve(&a, id, &lines)
        );
        assert_eq!(
            (&x, &y, &z),
            (&Reservation::Reserved, &Reservation::Reserved, &Reservation::Reserved)
        );
    }
    let (sa, sb) = (a.level_of("SKU-A").await.unwrap(), a.level_of("SKU-B").await.unwrap());
    assert_eq!((sa.reserved, sb.reserved), (30, 20));
    assert_eq!((sa.available, sb.available), (1_000_000 - 30, 1_000_000 - 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_is_never_oversold_and_short_orders_take_nothing() {
    let server = NatsServer::start();
    let n = nats(&server).await;
    kv::seed_stock(&n, &BTreeMap::from([("SKU-LIMITED".to_owned(), 10)]))
        .await
        .unwrap();
    let (a, b) = (
        KvStock::open(&n, HashMap::new()).await.unwrap(),
        KvStock::open(&n, HashMap::new()).await.unwrap(),
    );
    let one = BTreeMap::from([("SKU-LIMITED".to_owned(), 1), ("SKU-X".to_owned(), 1)]);
    let results = futures::future::join_all((0..32).map(|i| {
        let store = if i % 2 == 0 { &a } else { &b };
        reserve(store, OrderId::new(), &one)
    }))
    .await;
    let reserved = results.iter().filter(|r| **r == Reservation::Reserved).count();
    assert_eq!(reserved, 10, "{results:?}");
    let limited = a.level_of("SKU-LIMITED").await.unwrap();
    assert_eq!((limited.available, limited.reserved), (0, 10));
    // The short orders took nothing of their other line: SKU-X holds the ten.
    let x = a.level_of("SKU-X").await.unwrap();
    assert_eq!(x.reserved, 10);

    // A released reservation returns its stock, once.
    let id = OrderId::new();
    let two = BTreeMap::from([("SKU-Y".to_owned(), 2)]);
    assert_eq!(reserve(&a, id, &two).await, Reservation::Reserved);
    assert!(a.release(id).await.unwrap());
    assert!(!b.release(id).await.unwrap());
    assert!(!a.release(id).await.unwrap());
    let y = a.level_of("SKU-Y").await.unwrap();
    assert_eq!((y.available, y.reserved), (1_000_000, 0));
}

/// A plan that reads a SKU again (its cached level looked too low) must not
/// keep what its earlier orders took from the older level: the units they
/// took may be gone. Here `a` last saw 9 units, `b` has taken 5 since, and
/// ten reservations reach `a` at once (a current-thread runtime queues them
/// all before its committer runs, so they make one batch): four fit.
#[tokio::test]
async fn a_batch_that_reads_a_level_again_takes_only_what_is_left() {
    let server = NatsServer::start();
    let n = nats(&server).await;
    kv::seed_stock(&n, &BTreeMap::from([("SKU-L".to_owned(), 10)]))
        .await
        .unwrap();
    let (a, b) = (
        KvStock::open(&n, HashMap::new()).await.unwrap(),
        KvStock::open(&n, HashMap::new()).await.unwrap(),
    );
    let one = BTreeMap::from([("SKU-L".to_owned(), 1)]);
    assert_eq!(reserve(&a, OrderId::new(), &one).await, Reservation::Reserved);
    let five = BTreeMap::from([("SKU-L".to_owned(), 5)]);
    assert_eq!(reserve(&b, OrderId::new(), &five).await, Reservation::Reserved);
    let results = futures::future::join_all((0..10).map(|_| reserve(&a, OrderId::new(), &one))).await;
    let reserved = results.iter().filter(|r| **r == Reservation::Reserved).count();
    assert_eq!(reserved, 4, "{results:?}");
    let level = b.level_of("SKU-L").await.unwrap();
    assert_eq!((level.available, level.reserved), (0, 10));
}

/// "Short" is never decided on a level another process has changed since:
/// a store that saw the last unit go still reserves the unit another
/// process gave back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_given_back_elsewhere_can_be_reserved_at_once() {
    let server = NatsServer::start();
    let n = nats(&server).await;
    kv::seed_stock(&n, &BTreeMap::from([("SKU-ONE".to_owned(), 1)]))
        .await
        .unwrap();
    let (a, b) = (
        KvStock::open(&n, HashMap::new()).await.unwrap(),
        KvStock::open(&n, HashMap::new()).await.unwrap(),
    );
    let one = BTreeMap::from([("SKU-ONE".to_owned(), 1)]);
    let first = OrderId::new();
    assert_eq!(reserve(&a, first, &one).await, Reservation::Reserved);
    let short = reserve(&a, OrderId::new(), &one).await;
    assert!(
        matches!(short, Reservation::Insufficient { available: 0, .. }),
        "{short:?}"
    );
    // `b` gives the unit back; `a` last saw none left.
    assert!(b.release(first).await.unwrap());
    assert_eq!(reserve(&a, OrderId::new(), &one).await, Reservation::Reserved);
    let level = b.level_of("SKU-ONE").await.unwrap();
    assert_eq!((level.available, level.reserved), (0, 1));
}

/// A run whose batch was stored but whose confirmation was lost (a
/// time-out, a failover) leaves the order's record: the next run answers
/// from it and takes nothing again, and the release gives back what the
/// record says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_reservation_is_answered_from_its_record() {
    let server = NatsServer::start();
    let n = nats(&server).await;
    let stock = KvStock::open(&n, HashMap::new()).await.unwrap();
    let id = OrderId::new();
    let lines = BTreeMap::from([("SKU-H1".to_owned(), 3), ("SKU-H2".to_owned(), 2)]);
    // What the lost run stored, written as it would have been.
    let bucket = n.key_value(kv::INVENTORY).await.unwrap();
    let json = |v: serde_json::Value| bytes::Bytes::from(serde_json::to_vec(&v).unwrap());
    bucket
        .put(
            format!("order.{id}"),
            json(serde_json::json!({"state": "reserved", "lines": {"SKU-H1": 3, "SKU-H2": 2}})),
        )
        .await
        .unwrap();
    for (sku, qty) in &lines {
        bucket
            .put(
                format!("sku.{sku}"),
                json(serde_json::json!({"available": 1_000_000 - qty, "reserved": qty})),
            )
            .await
            .unwrap();
    }
    assert_eq!(reserve(&stock, id, &lines).await, Reservation::Reserved);
    for (sku, qty) in &lines {
        assert_eq!(stock.level_of(sku).await.unwrap().reserved, *qty, "{sku}");
    }
    assert!(stock.release(id).await.unwrap());
    for sku in lines.keys() {
        let l = stock.level_of(sku).await.unwrap();
        assert_eq!((l.available, l.reserved), (1_000_000, 0), "{sku}");
    }
    // A late run of the step finds the record released and takes nothing.
    assert_eq!(reserve(&stock, id, &lines).await, Reservation::Reserved);
    assert_eq!(stock.level_of("SKU-H2").await.unwrap().reserved, 0);
    assert!(!stock.release(id).await.unwrap());
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
    assert!(!stock.release(id).await.unwrap());
    let lines = BTreeMap::from([("SKU-L".to_owned(), 4)]);
    stock.reserve(id, &lines).await.unwrap();
    assert_eq!(stock.level_of("SKU-L").await.unwrap().reserved, 0);
}

/// An inventory bucket made before it took atomic batches is refused with
/// a clear error, and `waybill setup` (here `setup_buckets`) fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_without_atomic_batches_is_refused_until_set_up() {
    let server = NatsServer::start();
    let n = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    n.create_key_value(async_nats::jetstream::kv::Config {
        bucket: kv::INVENTORY.into(),
        history: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let e = KvStock::open(&n, HashMap::new()).await.unwrap_err();
    assert!(e.to_string().contains("waybill setup"), "{e}");
    kv::setup_buckets(&n, 1).await.unwrap();
    let stock = KvStock::open(&n, HashMap::new()).await.unwrap();
    let lines = BTreeMap::from([("SKU-Z".to_owned(), 1)]);
    assert_eq!(reserve(&stock, OrderId::new(), &lines).await, Reservation::Reserved);
}
