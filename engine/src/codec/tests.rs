//! The codec's own tests; the checked-in documents are in `tests/wire_format.rs`.

use super::*;
use crate::document::{Compensation, Payload, Status};
use crate::id::OrderId;
use crate::workflow::Workflow;

fn doc() -> Document {
    let wf = Workflow::builder("order", 1)
        .step("charge", "payment.charge")
        .compensate("payment.refund")
        .step("ship", "shipping.dispatch")
        .build()
        .unwrap();
    Document::new(
        OrderId::new(),
        wf.shared_route(),
        Payload::postcard(&("c-17", 3u32)).unwrap(),
    )
}

#[test]
fn round_trips_in_both_formats() {
    let c = Codec::default();
    let d = doc();
    for f in [Format::Postcard, Format::Json] {
        let bytes = c.encode(&d, f).unwrap();
        assert_eq!(c.decode(&bytes, f).unwrap(), d);
        assert_eq!(c.decode_as(&bytes, Some(f.content_type())).unwrap(), d);
    }
}

#[test]
fn waits_of_both_kinds_round_trip_as_version_2() {
    let wf = Workflow::builder("ship_later", 1)
        .step("pack", "shipping.pack")
        .step("ship", "shipping.dispatch")
        .not_before("delivery.not_before")
        .step("remind", "mail.remind")
        .delay(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    let d = Document::new(OrderId::new(), wf.shared_route(), Payload::postcard(&1u8).unwrap());
    let c = Codec::default();
    for f in [Format::Postcard, Format::Json] {
        let bytes = c.encode(&d, f).unwrap();
        assert_eq!(c.decode(&bytes, f).unwrap(), d, "{f:?}");
    }
    assert_eq!(c.encode(&d, Format::Postcard).unwrap()[2], 2);
    let json: serde_json::Value = serde_json::from_slice(&c.encode(&d, Format::Json).unwrap()).unwrap();
    assert_eq!(
        json["route"]["steps"][1]["wait"],
        serde_json::json!({"until": {"field": "delivery.not_before"}})
    );
}

#[test]
fn peek_reads_the_envelope_the_full_decode_would() {
    let c = Codec::default();
    let mut d = doc();
    d.hop = 4;
    d.attempt = 2;
    d.not_before = Some(Timestamp(77));
    for f in [Format::Postcard, Format::Json] {
        let bytes = c.encode(&d, f).unwrap();
        let e = c.peek(&bytes, f).unwrap();
        assert_eq!(
            (e.id, e.hop, e.status, e.step, e.attempt),
            (d.id, 4, Status::Running, 0, 2)
        );
        assert_eq!(e.not_before, Some(Timestamp(77)));
        assert_eq!(*e.route, *d.route);
    }
    // Compensating: the step is the one being undone, found in the owed list.
    d.status = Status::Compensating;
    d.step = 1;
    d.owed.push(Compensation {
        step: "charge".parse().unwrap(),
        service: "payment.refund".parse().unwrap(),
    });
    for f in [Format::Postcard, Format::Json] {
        let e = c.peek(&c.encode(&d, f).unwrap(), f).unwrap();
        assert_eq!((e.status, e.step), (Status::Compensating, 0));
    }
    let bin = c.encode(&d, Format::Postcard).unwrap();
    assert_eq!(c.peek(&bin[..20], Format::Postcard), Err(DecodeError::Truncated));
    assert_eq!(c.peek(b"junk", Format::Postcard), Err(DecodeError::BadMagic));
    assert_eq!(c.peek(&[], Format::Postcard), Err(DecodeError::Empty));
}

#[test]
fn every_malformed_input_is_a_typed_error() {
    let c = Codec::default();
    let d = doc();
    let bin = c.encode(&d, Format::Postcard).unwrap();

    assert_eq!(c.decode(&[], Format::Postcard), Err(DecodeError::Empty));
    assert_eq!(
        c.decode(&bin[..bin.len() - 3], Format::Postcard),
        Err(DecodeError::Truncated)
    );
    assert_eq!(c.decode(b"W", Format::Postcard), Err(DecodeError::Truncated));
    assert_eq!(c.decode(b"hello world", Format::Postcard), Err(DecodeError::BadMagic));
    let mut v4 = bin.clone();
    v4[2] = 4;
    assert_eq!(c.decode(&v4, Format::Postcard), Err(DecodeError::UnknownVersion(4)));
    // Version 1's route read as version 2's: each step lacks its wait.
    let mut as_v2 = bin.clone();
    as_v2[2] = 2;
    assert!(matches!(
        c.decode(&as_v2, Format::Postcard),
        Err(DecodeError::Malformed(_) | DecodeError::Truncated)
    ));
    let mut trailing = bin.clone();
    trailing.push(0);
    assert_eq!(
        c.decode(&trailing, Format::Postcard),
        Err(DecodeError::TrailingBytes(1))
    );
    assert_eq!(
        c.decode_as(&bin, Some("text/plain")),
        Err(DecodeError::UnknownContentType("text/plain".into()))
    );
    assert_eq!(c.decode_as(&bin, None), Err(DecodeError::MissingContentType));
    // A binary document read as JSON, and the other way round.
    assert!(matches!(c.decode(&bin, Format::Json), Err(DecodeError::Malformed(_))));
    let json = c.encode(&d, Format::Json).unwrap();
    assert_eq!(c.decode(&json, Format::Postcard), Err(DecodeError::BadMagic));

    let small = Codec::with_max_size(16);
    assert_eq!(
        small.decode(&bin, Format::Postcard),
        Err(DecodeError::TooLarge {
            size: bin.len(),
            max: 16
        })
    );
    assert!(matches!(
        small.encode(&d, Format::Postcard),
        Err(EncodeError::TooLarge { .. })
    ));

    let future = String::from_utf8(json.clone())
        .unwrap()
        .replace("\"envelope\":1", "\"envelope\":9");
    assert_eq!(
        c.decode(future.as_bytes(), Format::Json),
        Err(DecodeError::UnknownVersion(9))
    );
    assert_eq!(
        c.decode(&json[..json.len() / 2], Format::Json),
        Err(DecodeError::Truncated)
    );
}

#[test]
fn inconsistent_documents_are_refused() {
    let c = Codec::default();
    let mut d = doc();
    d.step = 7;
    let bin = c.encode(&d, Format::Postcard).unwrap();
    assert!(matches!(
        c.decode(&bin, Format::Postcard),
        Err(DecodeError::Inconsistent(_))
    ));

    let mut d = doc();
    d.status = Status::Compensating;
    let bin = c.encode(&d, Format::Postcard).unwrap();
    assert!(matches!(
        c.decode(&bin, Format::Postcard),
        Err(DecodeError::Inconsistent(_))
    ));

    let mut d = doc();
    Arc::make_mut(&mut d.route).steps.clear();
    let bin = c.encode(&d, Format::Postcard).unwrap();
    assert!(matches!(
        c.decode(&bin, Format::Postcard),
        Err(DecodeError::InvalidRoute(_))
    ));
}

fn other_doc() -> Document {
    let wf = Workflow::builder("refund", 2)
        .step("refund", "payment.refund")
        .build()
        .unwrap();
    Document::new(OrderId::new(), wf.shared_route(), Payload::postcard(&1u8).unwrap())
}

#[test]
fn a_codec_and_its_clones_share_the_routes_they_read() {
    let c = Codec::default();
    let (a, b) = (doc(), other_doc());
    // Written by another codec: the routes are new to `c`.
    let writer = Codec::default();
    let a_bin = writer.encode(&a, Format::Postcard).unwrap();
    let b_bin = writer.encode(&b, Format::Postcard).unwrap();

    let first = c.decode(&a_bin, Format::Postcard).unwrap();
    assert!(!Arc::ptr_eq(&first.route, &a.route));
    assert_eq!(c.routes.len(), (1, 1));
    // Again, through a clone, with another route read in between (so the
    // last-route shortcut misses and the map answers): the same route.
    let clone = c.clone();
    clone.decode(&b_bin, Format::Postcard).unwrap();
    let again = clone.decode(&a_bin, Format::Postcard).unwrap();
    assert!(Arc::ptr_eq(&first.route, &again.route));
    let peeked = clone.peek(&a_bin, Format::Postcard).unwrap();
    assert!(Arc::ptr_eq(&first.route, &peeked.route));
    assert_eq!(c.routes.len(), (2, 2));

    // Writing a document whose route the codec read finds its bytes by
    // identity: nothing is added.
    let out = c.encode(&again, Format::Postcard).unwrap();
    assert_eq!(out, a_bin);
    assert_eq!(c.routes.len(), (2, 2));

    // Another codec has routes of its own.
    let fresh = Codec::default();
    let other = fresh.decode(&a_bin, Format::Postcard).unwrap();
    assert!(!Arc::ptr_eq(&first.route, &other.route));
    assert_eq!(other.route, first.route);
    assert_eq!(writer.routes.len(), (0, 2));
}

#[test]
fn clones_on_other_threads_share_the_routes() {
    let c = Codec::default();
    let bin = Codec::default().encode(&doc(), Format::Postcard).unwrap();
    let route = c.decode(&bin, Format::Postcard).unwrap().route;
    let seen: Vec<Arc<Route>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (c, bin) = (c.clone(), &bin);
                s.spawn(move || c.decode(bin, Format::Postcard).unwrap().route)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(seen.iter().all(|r| Arc::ptr_eq(r, &route)));
}

#[test]
fn a_bad_route_is_not_cached() {
    let c = Codec::default();
    let mut d = doc();
    Arc::make_mut(&mut d.route).steps[0].timeout_ms = 0;
    let bin = c.encode(&d, Format::Postcard).unwrap();
    let before = c.routes.len();
    for _ in 0..2 {
        assert!(matches!(
            c.decode(&bin, Format::Postcard),
            Err(DecodeError::InvalidRoute(DefinitionError::BadStep { .. }))
        ));
    }
    assert_eq!(c.routes.len(), before);
}

#[test]
fn codec_debug_shows_its_limit() {
    assert_eq!(format!("{:?}", Codec::with_max_size(7)), "Codec { max_size: 7 }");
}
