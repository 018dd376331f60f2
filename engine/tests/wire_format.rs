//! The wire format, pinned: documents written by envelope versions 1 and 2
//! and checked in under `tests/data/` must keep decoding to the same
//! documents, and those documents must re-encode to the very same bytes (a
//! route without a wait is still written as version 1). A change to a
//! domain type that would change the bytes on the wire fails here.
//!
//! The files were written once, by the codec as it was when this test was
//! added. To write them again (only for a deliberate change of the format,
//! together with a new `ENVELOPE_VERSION`):
//! `WAYBILL_BLESS_WIRE=1 cargo test -p waybill --test wire_format`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use waybill::{
    AttemptResult, Backoff, BranchAt, Codec, Compensation, ContentType, Document, Format, Join, Merge, Next, OrderId, Payload, Status,
    StepKind, StepRecord, Then, Timestamp, WorkerId, Workflow,
};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// A route with every kind of branch, compensations, every retry shape and a
/// bounded loop.
fn route() -> Arc<waybill::Route> {
    Workflow::builder("order", 3)
        .step("charge", "payment.charge")
        .compensate("payment.refund")
        .retry(Backoff::exponential(4, Duration::from_millis(150)).with_max_delay(Duration::from_secs(5)))
        .timeout(Duration::from_millis(2500))
        .on("declined", Then::Fail)
        .on("review", Then::step("verify"))
        .step("reserve", "inventory.reserve")
        .compensate("inventory.release")
        .retry(Backoff::fixed(2, Duration::from_millis(40)))
        .on("backorder", Then::Continue)
        .on("ok", Then::step("ship"))
        .step("verify", "fraud.verify-manual")
        .retry(Backoff::none())
        .max_visits(3)
        .on("again", Then::step("verify"))
        .on("ok", Then::step("reserve"))
        .on("cleared", Then::Complete)
        .step("ship", "shipping.dispatch")
        .build()
        .unwrap()
        .shared_route()
}

fn id(n: u128) -> OrderId {
    OrderId::from_uuid(uuid::Uuid::from_u128(0x0193_8a4c_7e21_7c3d_9b5e_0000_0000_0000 | n))
}

fn record(step: &str, service: &str, kind: StepKind, attempt: u32, result: AttemptResult, at: u64) -> StepRecord {
    StepRecord {
        step: step.parse().unwrap(),
        service: service.parse().unwrap(),
        kind,
        attempt,
        result,
        detail: None,
        started_at: Timestamp(at),
        ended_at: Timestamp(at + 1_250),
        worker: WorkerId::new(format!("host-{}", attempt + 6)),
    }
}

fn outcome(o: &str) -> AttemptResult {
    AttemptResult::Outcome(o.into())
}

/// Running, on a retry of `reserve`, with every kind of history record:
/// outcomes, a transient and a permanent error, a wait on infrastructure.
fn running() -> Document {
    let mut d = Document::new(
        id(1),
        route(),
        Payload::postcard(&("cust-17", "Zürich — 東京 ✓ 🚚", 3u32, vec![42i64, -7])).unwrap(),
    );
    d.hop = 6;
    d.step = 1;
    d.attempt = 2;
    d.not_before = Some(Timestamp(1_764_000_000_450_000));
    d.created_at = Timestamp(1_764_000_000_000_000);
    let t = 1_764_000_000_100_000;
    d.history = vec![
        record(
            "charge",
            "payment.charge",
            StepKind::Forward,
            1,
            AttemptResult::Error {
                message: "gateway timed out après 2.5 s".into(),
                transient: true,
            },
            t,
        ),
        record(
            "charge",
            "payment.charge",
            StepKind::Forward,
            2,
            outcome("review"),
            t + 10_000,
        ),
        StepRecord {
            detail: Some("manual check: ok ✔".into()),
            ..record(
                "verify",
                "fraud.verify-manual",
                StepKind::Forward,
                1,
                outcome("ok"),
                t + 20_000,
            )
        },
        record(
            "reserve",
            "inventory.reserve",
            StepKind::Forward,
            1,
            AttemptResult::Unavailable {
                message: "no responders: KV_stock".into(),
                since: Timestamp(t + 30_000),
                tries: 4,
            },
            t + 40_000,
        ),
        record(
            "reserve",
            "inventory.reserve",
            StepKind::Forward,
            1,
            AttemptResult::Error {
                message: "lease held by another run".into(),
                transient: true,
            },
            t + 50_000,
        ),
        record(
            "reserve",
            "inventory.reserve",
            StepKind::Forward,
            1,
            AttemptResult::Error {
                message: "SKU «X-1» is not sold".into(),
                transient: false,
            },
            t + 60_000,
        ),
    ];
    d.owed = vec![Compensation {
        step: "charge".parse().unwrap(),
        service: "payment.refund".parse().unwrap(),
    }];
    d
}

/// Compensating after `ship` failed for good: two undoings owed, one done.
fn compensating() -> Document {
    let payload = serde_json::json!({
        "customer": "Ørsted ÅB",
        "lines": [{"sku": "ÉCLAIR-1", "qty": 2}, {"sku": "茶-9", "qty": 1}],
        "note": "leave at the door 🚪",
        "total": 12.5,
    });
    let mut d = Document::new(id(2), route(), Payload::json(&payload).unwrap());
    d.hop = 9;
    d.status = Status::Compensating;
    d.step = 3;
    d.attempt = 1;
    d.created_at = Timestamp(1_764_000_100_000_000);
    let t = 1_764_000_100_200_000;
    d.history = vec![
        record("charge", "payment.charge", StepKind::Forward, 1, outcome("ok"), t),
        StepRecord {
            detail: Some("held 2 units".into()),
            ..record(
                "reserve",
                "inventory.reserve",
                StepKind::Forward,
                1,
                outcome("ok"),
                t + 5_000,
            )
        },
        record(
            "ship",
            "shipping.dispatch",
            StepKind::Forward,
            1,
            AttemptResult::Error {
                message: "address refused: «Straße» unknown".into(),
                transient: false,
            },
            t + 9_000,
        ),
        record(
            "reserve",
            "inventory.release",
            StepKind::Compensation,
            1,
            AttemptResult::Unavailable {
                message: "stream WAYBILL_HOPS electing a leader".into(),
                since: Timestamp(t + 10_000),
                tries: 2,
            },
            t + 11_000,
        ),
    ];
    d.owed = vec![
        Compensation {
            step: "charge".parse().unwrap(),
            service: "payment.refund".parse().unwrap(),
        },
        Compensation {
            step: "reserve".parse().unwrap(),
            service: "inventory.release".parse().unwrap(),
        },
    ];
    d.failure = Some("step `ship` failed: address refused: «Straße» unknown".into());
    d
}

/// Completed, its JSON payload in other scripts.
fn finished() -> Document {
    let payload = serde_json::json!({"city": "Αθήνα", "gift": true, "qty": 1, "to": "José Ñúñez"});
    let mut d = Document::new(id(3), route(), Payload::json(&payload).unwrap());
    d.hop = 3;
    d.status = Status::Completed;
    d.step = 3;
    d.attempt = 1;
    d.created_at = Timestamp(1_764_000_200_000_000);
    let t = 1_764_000_200_300_000;
    d.history = vec![
        record("charge", "payment.charge", StepKind::Forward, 1, outcome("ok"), t),
        record(
            "reserve",
            "inventory.reserve",
            StepKind::Forward,
            1,
            outcome("ok"),
            t + 3_000,
        ),
        StepRecord {
            detail: Some("tracking 1Z999AA1 — 配達中".into()),
            ..record(
                "ship",
                "shipping.dispatch",
                StepKind::Forward,
                1,
                outcome("ok"),
                t + 6_000,
            )
        },
    ];
    d.owed = vec![
        Compensation {
            step: "charge".parse().unwrap(),
            service: "payment.refund".parse().unwrap(),
        },
        Compensation {
            step: "reserve".parse().unwrap(),
            service: "inventory.release".parse().unwrap(),
        },
    ];
    d
}

/// Cancelled at its ship hop, after the charge and the reservation were
/// undone (the `Cancelled` record came after version 1's first documents:
/// its files were added then, and the older ones kept their bytes).
fn cancelled() -> Document {
    let mut d = Document::new(id(4), route(), Payload::postcard(&("c-9", 2u32)).unwrap());
    d.hop = 5;
    d.status = Status::Cancelled;
    d.step = 2;
    d.attempt = 1;
    d.created_at = Timestamp(1_764_000_300_000_000);
    d.failure = Some("cancelled: the customer called".into());
    let t = 1_764_000_300_100_000;
    d.history = vec![
        record("charge", "payment.charge", StepKind::Forward, 1, outcome("ok"), t),
        record(
            "reserve",
            "inventory.reserve",
            StepKind::Forward,
            1,
            outcome("ok"),
            t + 1_000,
        ),
        record(
            "ship",
            "shipping.dispatch",
            StepKind::Forward,
            1,
            AttemptResult::Cancelled {
                reason: "the customer called".into(),
            },
            t + 2_000,
        ),
        record(
            "reserve",
            "inventory.release",
            StepKind::Compensation,
            1,
            outcome("ok"),
            t + 3_000,
        ),
        record(
            "charge",
            "payment.refund",
            StepKind::Compensation,
            1,
            outcome("ok"),
            t + 4_000,
        ),
    ];
    d
}

/// Version 2: a route whose steps wait (the first, and one in the middle),
/// the order asleep before its second step.
fn waiting() -> Document {
    let route = Workflow::builder("reminder", 1)
        .step("hold", "booking.hold")
        .delay(Duration::from_secs(90))
        .compensate("booking.release")
        .step("remind", "mail.remind")
        .delay(Duration::from_secs(2 * 24 * 3600))
        .on("ignored", Then::Fail)
        .step("confirm", "booking.confirm")
        .build()
        .unwrap()
        .shared_route();
    let mut d = Document::new(id(5), route, Payload::postcard(&("trip-1", 2u8)).unwrap());
    d.hop = 1;
    d.step = 1;
    d.created_at = Timestamp(1_764_000_400_000_000);
    d.not_before = Some(Timestamp(1_764_172_800_000_000 + 90_000_000 + 2_000));
    let t = 1_764_000_490_000_000;
    d.history = vec![record("hold", "booking.hold", StepKind::Forward, 1, outcome("ok"), t)];
    d.owed = vec![Compensation {
        step: "hold".parse().unwrap(),
        service: "booking.release".parse().unwrap(),
    }];
    d
}

/// Version 2 with signals: a step that waits for one (its timeout going
/// to another step), another that waits until a payload time, and the
/// history of an order that received one and timed out on none.
fn signalled() -> Document {
    let route = Workflow::builder("approval", 1)
        .step("hold", "booking.hold")
        .compensate("booking.release")
        .step("book", "booking.confirm")
        .await_signal("approved", Duration::from_secs(48 * 3600))
        .on_timeout(Then::step("nudge"))
        .on("ok", Then::Complete)
        .step("nudge", "mail.nudge")
        .not_before("nudge_at")
        .build()
        .unwrap()
        .shared_route();
    let mut d = Document::new(id(6), route, Payload::postcard(&("trip-2", 3u8)).unwrap());
    d.hop = 1;
    d.step = 1;
    d.created_at = Timestamp(1_764_000_500_000_000);
    d.not_before = None;
    let t = 1_764_000_590_000_000;
    d.history = vec![
        record("hold", "booking.hold", StepKind::Forward, 1, outcome("ok"), t),
        record(
            "book",
            "booking.confirm",
            StepKind::Forward,
            1,
            AttemptResult::Signal {
                name: "approved".parse().unwrap(),
                data: Some(r#"{"by":"ana"}"#.into()),
            },
            t + 60_000_000,
        ),
    ];
    d.owed = vec![Compensation {
        step: "hold".parse().unwrap(),
        service: "booking.release".parse().unwrap(),
    }];
    d
}

/// Version 3: a route that forks (two branches, joined on the first to
/// complete, payloads kept) and the document of its second branch, one
/// step in, forked after the first step.
fn forked() -> Document {
    let route = Workflow::builder("quotes", 1)
        .step("ask", "quote.ask")
        .compensate("quote.forget")
        .fork("desks")
        .branch()
        .step("town", "desk.town")
        .compensate("desk.town.release")
        .branch()
        .step("airport", "desk.airport")
        .compensate("desk.airport.release")
        .on("busy", Then::step("airport_again"))
        .step("airport_again", "desk.airport")
        .join(Join::first(1).merge(Merge::Keep))
        .step("pay", "quote.pay")
        .build()
        .unwrap()
        .shared_route();
    let mut d = Document::new(id(7), route, Payload::postcard(&("trip-3", 4u8)).unwrap());
    d.hop = 3;
    d.step = 3;
    d.created_at = Timestamp(1_764_000_600_000_000);
    let t = 1_764_000_690_000_000;
    d.history = vec![
        record("ask", "quote.ask", StepKind::Forward, 1, outcome("ok"), t),
        record("airport", "desk.airport", StepKind::Forward, 1, outcome("busy"), t + 1_000_000),
    ];
    d.owed = vec![
        Compensation {
            step: "ask".parse().unwrap(),
            service: "quote.forget".parse().unwrap(),
        },
        Compensation {
            step: "airport".parse().unwrap(),
            service: "desk.airport.release".parse().unwrap(),
        },
    ];
    d.branch = Some(BranchAt {
        fork: 0,
        branch: 1,
        hop_at: 2,
        history_at: 1,
        owed_at: 1,
    });
    d
}

fn cases() -> [(&'static str, Document); 7] {
    [
        ("forked", forked()),
        ("running", running()),
        ("compensating", compensating()),
        ("finished", finished()),
        ("cancelled", cancelled()),
        ("waiting", waiting()),
        ("signalled", signalled()),
    ]
}

/// The envelope version each case is written in.
fn version(case: &str) -> u8 {
    match case {
        "forked" => 3,
        "waiting" | "signalled" => 2,
        _ => 1,
    }
}

fn file(case: &str, format: Format) -> String {
    let ext = match format {
        Format::Postcard => "bin",
        Format::Json => "json",
    };
    format!("envelope-v{}-{case}.{ext}", version(case))
}

/// The checked-in bytes of a case. When blessing, they are written first
/// (through a rename, so a test reading the file meanwhile sees it whole).
fn golden(case: &str, format: Format) -> Vec<u8> {
    let path = data(&file(case, format));
    if std::env::var_os("WAYBILL_BLESS_WIRE").is_some() {
        let doc = cases().into_iter().find(|(c, _)| *c == case).unwrap().1;
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let tmp = path.with_extension(format!("tmp-{:?}", std::thread::current().id()));
        std::fs::write(&tmp, Codec::default().encode(&doc, format).unwrap()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn checked_in_documents_decode_and_re_encode_to_the_same_bytes() {
    let codec = Codec::default();
    for (case, want) in cases() {
        for format in [Format::Postcard, Format::Json] {
            let bytes = golden(case, format);
            match format {
                Format::Postcard => assert_eq!(bytes[2], version(case), "{case}: envelope version"),
                Format::Json => {
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    assert_eq!(v["envelope"], u64::from(version(case)), "{case}: envelope version");
                }
            }
            let got = codec
                .decode(&bytes, format)
                .unwrap_or_else(|e| panic!("{case} {format:?}: {e}"));
            assert_eq!(got, want, "{case} {format:?}");
            let again = codec.encode(&got, format).unwrap();
            assert!(again == bytes, "{case} {format:?}: re-encoded bytes differ");
            // And what the tests build encodes to the files too.
            assert!(
                codec.encode(&want, format).unwrap() == bytes,
                "{case} {format:?}: encoding changed"
            );
            let env = codec.peek(&bytes, format).unwrap();
            assert_eq!(
                (env.id, env.hop, env.status, env.attempt, env.not_before),
                (want.id, want.hop, want.status, want.attempt, want.not_before),
                "{case} {format:?}"
            );
            assert_eq!(*env.route, *want.route);
        }
    }
}

/// The same documents, read field by field, independent of how the tests
/// build them: what a reader of the files gets.
#[test]
fn the_running_document_reads_field_by_field() {
    let codec = Codec::default();
    for format in [Format::Postcard, Format::Json] {
        let bytes = golden("running", format);
        let d = codec.decode(&bytes, format).unwrap();
        assert_eq!(d.id.to_string(), "01938a4c-7e21-7c3d-9b5e-000000000001");
        assert_eq!((d.hop, d.status, d.step, d.attempt), (6, Status::Running, 1, 2));
        assert_eq!(d.not_before, Some(Timestamp(1_764_000_000_450_000)));
        assert_eq!(d.created_at, Timestamp(1_764_000_000_000_000));
        assert_eq!(d.failure, None);

        let r = &d.route;
        assert_eq!((r.workflow.as_str(), r.version, r.steps.len()), ("order", 3, 4));
        let charge = &r.steps[0];
        assert_eq!(
            (charge.name.as_str(), charge.service.as_str()),
            ("charge", "payment.charge")
        );
        assert_eq!(charge.compensate.as_ref().map(|s| s.as_str()), Some("payment.refund"));
        assert_eq!(
            charge.retry,
            Backoff {
                max_attempts: 4,
                initial_ms: 150,
                max_ms: 5_000,
                multiplier: 2.0,
                jitter: 0.2
            }
        );
        assert_eq!((charge.timeout_ms, charge.max_visits), (2_500, None));
        let branches: Vec<(&str, Next)> = charge.branches.iter().map(|b| (b.outcome.as_str(), b.next)).collect();
        assert_eq!(branches, [("declined", Next::Fail), ("review", Next::Goto(2))]);
        let reserve = &r.steps[1];
        assert_eq!(
            (
                reserve.retry.max_attempts,
                reserve.retry.initial_ms,
                reserve.retry.max_ms
            ),
            (2, 40, 40)
        );
        assert_eq!((reserve.retry.multiplier, reserve.retry.jitter), (1.0, 0.0));
        let branches: Vec<(&str, Next)> = reserve.branches.iter().map(|b| (b.outcome.as_str(), b.next)).collect();
        assert_eq!(branches, [("backorder", Next::Continue), ("ok", Next::Goto(3))]);
        let verify = &r.steps[2];
        assert_eq!(verify.compensate, None);
        assert_eq!(verify.retry, Backoff::none());
        assert_eq!((verify.timeout_ms, verify.max_visits), (30_000, Some(3)));
        let branches: Vec<(&str, Next)> = verify.branches.iter().map(|b| (b.outcome.as_str(), b.next)).collect();
        assert_eq!(
            branches,
            [
                ("again", Next::Goto(2)),
                ("ok", Next::Goto(1)),
                ("cleared", Next::Complete)
            ]
        );
        assert_eq!(r.steps[3].service.as_str(), "shipping.dispatch");
        assert!(r.steps[3].branches.is_empty());

        assert_eq!(d.history.len(), 6);
        let h0 = &d.history[0];
        assert_eq!(
            (h0.step.as_str(), h0.service.as_str(), h0.kind, h0.attempt),
            ("charge", "payment.charge", StepKind::Forward, 1)
        );
        assert_eq!(
            h0.result,
            AttemptResult::Error {
                message: "gateway timed out après 2.5 s".into(),
                transient: true
            }
        );
        assert_eq!(
            (h0.started_at, h0.ended_at, h0.worker.as_str()),
            (
                Timestamp(1_764_000_000_100_000),
                Timestamp(1_764_000_000_101_250),
                "host-7"
            )
        );
        assert_eq!(h0.detail, None);
        assert_eq!(d.history[1].result, AttemptResult::Outcome("review".into()));
        assert_eq!(d.history[2].detail.as_deref(), Some("manual check: ok ✔"));
        assert_eq!(
            d.history[3].result,
            AttemptResult::Unavailable {
                message: "no responders: KV_stock".into(),
                since: Timestamp(1_764_000_000_130_000),
                tries: 4
            }
        );
        assert_eq!(
            d.history[5].result,
            AttemptResult::Error {
                message: "SKU «X-1» is not sold".into(),
                transient: false
            }
        );
        assert_eq!(d.owed.len(), 1);
        assert_eq!(
            (d.owed[0].step.as_str(), d.owed[0].service.as_str()),
            ("charge", "payment.refund")
        );

        assert_eq!(d.payload.content_type, ContentType::Postcard);
        let (customer, note, qty, nums): (String, String, u32, Vec<i64>) = d.payload.decode().unwrap();
        assert_eq!(
            (customer.as_str(), note.as_str(), qty, nums),
            ("cust-17", "Zürich — 東京 ✓ 🚚", 3, vec![42, -7])
        );
    }
}

#[test]
fn the_compensating_and_finished_documents_read_field_by_field() {
    let codec = Codec::default();
    for format in [Format::Postcard, Format::Json] {
        let bytes = golden("compensating", format);
        let d = codec.decode(&bytes, format).unwrap();
        assert_eq!(d.id.to_string(), "01938a4c-7e21-7c3d-9b5e-000000000002");
        assert_eq!((d.hop, d.status, d.step, d.attempt), (9, Status::Compensating, 3, 1));
        assert_eq!(d.not_before, None);
        assert_eq!(
            d.failure.as_deref(),
            Some("step `ship` failed: address refused: «Straße» unknown")
        );
        let owed: Vec<(&str, &str)> = d.owed.iter().map(|c| (c.step.as_str(), c.service.as_str())).collect();
        assert_eq!(owed, [("charge", "payment.refund"), ("reserve", "inventory.release")]);
        let last = &d.history[3];
        assert_eq!(
            (last.step.as_str(), last.service.as_str(), last.kind),
            ("reserve", "inventory.release", StepKind::Compensation)
        );
        assert!(last.result.is_unavailable());
        assert_eq!(d.payload.content_type, ContentType::Json);
        let p: serde_json::Value = d.payload.decode().unwrap();
        assert_eq!(p["customer"], "Ørsted ÅB");
        assert_eq!(p["lines"][1]["sku"], "茶-9");
        assert_eq!(p["total"], 12.5);
        // The coordinator's view of it: the step being undone.
        let env = codec.peek(&bytes, format).unwrap();
        assert_eq!((env.status, env.step), (Status::Compensating, 1));

        let bytes = golden("finished", format);
        let d = codec.decode(&bytes, format).unwrap();
        assert_eq!(d.id.to_string(), "01938a4c-7e21-7c3d-9b5e-000000000003");
        assert_eq!((d.hop, d.status, d.step, d.attempt), (3, Status::Completed, 3, 1));
        assert_eq!(d.history.len(), 3);
        assert_eq!(d.history[2].detail.as_deref(), Some("tracking 1Z999AA1 — 配達中"));
        assert_eq!(d.owed.len(), 2);
        assert_eq!(
            d.payload.bytes,
            r#"{"city":"Αθήνα","gift":true,"qty":1,"to":"José Ñúñez"}"#.as_bytes()
        );
    }
}

/// What JSON readers in other languages rely on, seen in the file itself.
#[test]
fn the_json_files_spell_the_fields_as_documented() {
    let text = String::from_utf8(golden("running", Format::Json)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["envelope"], 1);
    assert_eq!(v["status"], "running");
    assert_eq!(v["route"]["workflow"], "order");
    assert_eq!(v["route"]["steps"][0]["branches"][0]["next"], "Fail");
    assert_eq!(v["route"]["steps"][0]["branches"][1]["next"]["Goto"], 2);
    assert_eq!(v["history"][0]["kind"], "forward");
    assert_eq!(v["history"][0]["result"]["error"]["transient"], true);
    assert_eq!(v["history"][3]["result"]["unavailable"]["tries"], 4);
    assert_eq!(v["history"][1]["result"]["outcome"], "review");
    assert_eq!(v["payload"]["content_type"], "application/postcard");
    assert!(v["payload"]["bytes"].is_array());

    let text = String::from_utf8(golden("compensating", Format::Json)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["status"], "compensating");
    assert_eq!(v["history"][3]["kind"], "compensation");
    assert_eq!(v["payload"]["content_type"], "application/json");
    assert_eq!(v["payload"]["json"]["customer"], "Ørsted ÅB");
}

#[test]
fn the_waiting_document_reads_field_by_field() {
    let codec = Codec::default();
    for format in [Format::Postcard, Format::Json] {
        let d = codec.decode(&golden("waiting", format), format).unwrap();
        let waits: Vec<Option<waybill::Wait>> = d.route.steps.iter().map(|s| s.wait.clone()).collect();
        assert_eq!(
            waits,
            [
                Some(waybill::Wait::Delay { ms: 90_000 }),
                Some(waybill::Wait::Delay { ms: 172_800_000 }),
                None
            ],
            "{format:?}"
        );
        assert_eq!(d.not_before, Some(Timestamp(1_764_172_890_002_000)));
        assert_eq!((d.hop, d.step), (1, 1));
    }
}

#[test]
fn the_signalled_document_reads_field_by_field() {
    let codec = Codec::default();
    for format in [Format::Postcard, Format::Json] {
        let d = codec.decode(&golden("signalled", format), format).unwrap();
        assert_eq!(
            d.route.steps[1].wait,
            Some(waybill::Wait::Signal {
                name: "approved".parse().unwrap(),
                timeout_ms: 172_800_000,
                on_timeout: waybill::Next::Goto(2),
            }),
            "{format:?}"
        );
        assert_eq!(
            d.route.steps[2].wait,
            Some(waybill::Wait::Until {
                field: "nudge_at".into()
            })
        );
        assert_eq!(d.signal("approved"), Some(r#"{"by":"ana"}"#), "{format:?}");
        assert_eq!(d.awaited_signal(), None, "received: the step runs");
    }
    let json: serde_json::Value = serde_json::from_slice(&golden("signalled", Format::Json)).unwrap();
    assert_eq!(json["envelope"], 2);
    assert_eq!(
        json["route"]["steps"][1]["wait"]["signal"]["name"], "approved",
        "{json}"
    );
    assert_eq!(
        json["history"][1]["result"]["signal"]["data"], r#"{"by":"ana"}"#,
        "{json}"
    );
}

#[test]
fn the_forked_document_reads_field_by_field() {
    let codec = Codec::default();
    for format in [Format::Postcard, Format::Json] {
        let bytes = golden("forked", format);
        let d = codec.decode(&bytes, format).unwrap();
        let fork = &d.route.forks[0];
        assert_eq!(fork.name.as_str(), "desks");
        assert_eq!(fork.starts, [1, 2]);
        assert_eq!(fork.end, 4);
        assert_eq!(fork.join, Join::first(1).merge(Merge::Keep));
        let b = d.branch.unwrap();
        assert_eq!((b.fork, b.branch, b.hop_at, b.history_at, b.owed_at), (0, 1, 2, 1, 1));
        // The envelope says whose hop it is: the coordinator keeps a
        // branch's hops apart from the order's own.
        assert_eq!(codec.peek(&bytes, format).unwrap().branch, d.branch, "{format:?}");
    }
    let json: serde_json::Value = serde_json::from_slice(&golden("forked", Format::Json)).unwrap();
    assert_eq!(json["envelope"], 3);
    assert_eq!(json["route"]["forks"][0]["first"], 1, "{json}");
    assert_eq!(json["route"]["forks"][0]["merge"], "keep", "{json}");
    assert_eq!(json["branch"]["history_at"], 1, "{json}");
    // A document of an older version has neither.
    let json: serde_json::Value = serde_json::from_slice(&golden("signalled", Format::Json)).unwrap();
    assert!(json["route"].get("forks").is_none() && json.get("branch").is_none(), "{json}");
}

#[test]
fn an_envelope_version_past_this_builds_is_refused() {
    let codec = Codec::default();
    let mut bytes = golden("waiting", Format::Postcard);
    bytes[2] = waybill::codec::ENVELOPE_VERSION + 1;
    let e = codec.decode(&bytes, Format::Postcard).unwrap_err();
    assert!(matches!(e, waybill::DecodeError::UnknownVersion(4)), "{e}");
    bytes[2] = 0;
    assert!(matches!(
        codec.decode(&bytes, Format::Postcard).unwrap_err(),
        waybill::DecodeError::UnknownVersion(0)
    ));
}
