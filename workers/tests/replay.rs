//! The example order flows replayed on the embedded default, with the
//! invariants that show nothing was lost or done twice.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::HashMap;
use waybill_testkit::workspace_root;

use waybill::Status;
use waybill_workers::replay::{self, EmbeddedRuntime, ReplayOptions};
use waybill_workflows::Order;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_ends_as_expected_and_money_and_stock_add_up() {
    let registry = waybill_workflows::registry().unwrap();
    let files: Vec<_> = replay::expand(&[workspace_root().join("examples/orders")])
        .unwrap()
        .iter()
        .map(|p| replay::load(p, &registry).unwrap())
        .collect();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["happy", "declined", "out-of-stock", "unshippable", "transient", "mixed"] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "no {want} example file in {names:?}"
        );
    }
    let mixed = files.iter().find(|f| f.path.ends_with("mixed.jsonl")).unwrap();
    assert!(mixed.orders.len() >= 1000);

    let stock = replay::load_stock(&workspace_root().join("examples/stock.json")).unwrap();
    let opts = ReplayOptions::default();
    let engine = EmbeddedRuntime::start(stock.clone(), &opts).await.unwrap();
    let mut by_status: HashMap<Status, usize> = HashMap::new();
    let mut trips: HashMap<Status, usize> = HashMap::new();
    let mut completed_qty: HashMap<String, i64> = HashMap::new();
    let (mut charged, mut refunded) = (0u64, 0u64);
    for f in &files {
        let report = engine
            .run(&f.path.display().to_string(), &f.orders, &opts, |_, _| {})
            .await;
        assert!(report.ok(), "{}: {:#?}", report.file, report.mismatches);
        assert_eq!(report.orders, f.orders.len());
        assert_eq!(
            report.completed + report.failed + report.compensated + report.cancelled,
            report.orders
        );
        for o in &f.orders {
            if o.workflow.name().as_str() == waybill_workflows::trip::TRIP {
                *trips.entry(o.expect).or_default() += 1;
                continue;
            }
            *by_status.entry(o.expect).or_default() += 1;
            let order: Order = o.payload.decode().unwrap();
            // Compensated with its card declined (`cooling_off` charges
            // after reserving): never charged, so nothing to refund.
            let declined = order.payment.card == waybill_workflows::samples::CARD_DECLINED;
            match o.expect {
                Status::Completed => charged += 1,
                Status::Compensated if !declined => {
                    charged += 1;
                    refunded += 1;
                }
                _ => {}
            }
            if o.expect == Status::Completed {
                for item in order.items {
                    *completed_qty.entry(item.sku).or_default() += item.qty;
                }
            }
        }
    }
    assert!(
        engine.transport.dead_letters().is_empty(),
        "{:#?}",
        engine.transport.dead_letters()
    );

    // Money: each completed order charged once, each compensated one charged
    // and refunded once (unless its card was declined), each failed one
    // never charged.
    let ledger = engine.services.payment.ledger();
    let completed = by_status[&Status::Completed] as u64;
    assert_eq!(ledger.charges_applied(), charged);
    assert_eq!(ledger.refunds_applied(), refunded);
    let entries = ledger.snapshot();
    assert_eq!(
        entries.values().filter(|e| e.charged && !e.refunded).count() as u64,
        completed
    );

    // Stock: conserved for every SKU, and what stays reserved is exactly what
    // completed orders took.
    let inventory = engine.services.inventory.stock();
    for (sku, level) in inventory.levels() {
        assert_eq!(
            level.available + level.reserved,
            inventory.initial(&sku),
            "{sku} is not conserved"
        );
        assert_eq!(level.reserved, completed_qty.get(&sku).copied().unwrap_or(0), "{sku}");
    }
    assert_eq!(engine.services.shipping.log().count() as u64, completed);

    // Trips: the booked ones keep their three holds and their charge, and
    // were booked on their approval; every other hold was given back and
    // every other charge refunded.
    let booked = trips[&Status::Completed];
    assert!(booked > 0 && trips[&Status::Cancelled] > 0, "{trips:?}");
    let t = engine.services.trip.state();
    assert_eq!(t.bookings.len(), booked);
    assert!(
        t.bookings.values().all(|approval| approval.contains("\"by\"")),
        "{:?}",
        t.bookings
    );
    assert_eq!(t.holds.len(), 3 * booked, "{:?}", t.holds);
    assert!(t.holds.keys().all(|(order, _)| t.bookings.contains_key(order)));
    assert_eq!(t.charges.len(), booked);
    assert!(t.refunds > 0);
    engine.shutdown().await;
}

#[test]
fn a_bad_line_is_an_error_naming_the_file_and_line() {
    let dir = std::env::temp_dir().join(format!("waybill-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let registry = waybill_workflows::registry().unwrap();
    let good = r#"{"expect":"completed","customer":"c","items":[{"sku":"A","qty":1,"unit_price_cents":1}],"payment":{"card":"4242"},"ship_to":{"country":"DE","zip":"1"}}"#;
    let cases = [
        ("not json", "line 2: not JSON"),
        ("[1,2]", "line 2: expected a JSON object"),
        (
            &good.replace(r#""expect":"completed","#, ""),
            "line 2: missing field `expect`",
        ),
        (&good.replace("completed", "done"), "line 2: unknown status `done`"),
        (
            &good.replace("completed", "running"),
            "line 2: `expect` must be a terminal status",
        ),
        (
            &good.replace(r#""qty":1"#, r#""qty":0"#),
            "line 2: invalid order payload: items[0].qty",
        ),
        (
            &good.replace(r#""expect""#, r#""workflow":"nope","expect""#),
            "line 2: unknown workflow `nope`",
        ),
    ];
    for (i, (bad, want)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.jsonl"));
        std::fs::write(&path, format!("{good}\n{bad}\n")).unwrap();
        let e = replay::load(&path, &registry).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains(want),
            "{e:?} should say {want:?}"
        );
    }
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    assert!(replay::load(&empty, &registry)
        .unwrap_err()
        .to_string()
        .contains("no order flows"));
    let e = replay::expand(&[dir.join("missing.jsonl")]).unwrap_err().to_string();
    assert!(e.contains("missing.jsonl"), "{e}");
    let bad_stock = dir.join("stock.json");
    std::fs::write(&bad_stock, r#"{"A": -1}"#).unwrap();
    assert!(replay::load_stock(&bad_stock)
        .unwrap_err()
        .to_string()
        .contains("negative stock"));
    std::fs::remove_dir_all(&dir).unwrap();
}
