//! The conformance suite of the transport seam: the rules every transport
//! keeps, written once and run against each of them by this crate's tests
//! (`tests/conformance_embedded.rs`, `tests/conformance_nats.rs`). One file
//! per seam: consumers here, the log in `log`, requests in `rpc`, and the
//! coordinator written once over both in `coordinator`.
//!
//! Each check uses subjects and consumer names of its own, so all of them can
//! share one transport. Durations are short but real: under a paused tokio
//! clock they cost nothing, against a server they cost what they say.
//! A failed check panics with a message saying which rule broke: these are
//! test helpers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;

use super::{Consumer, ConsumerConfig, Delivery, Headers, Outgoing, Transport};
use crate::id::MsgId;

mod coordinator;
mod log;
mod rpc;

pub use coordinator::coordinator_tracks_and_redrives;
pub use log::*;
pub use rpc::*;

/// How long a check waits for something that should happen.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// Subjects the checks use: under `waybill.hop.`, so that a transport storing
/// only Waybill's subjects stores them.
pub(crate) const SUBJECT_PREFIX: &str = "waybill.hop.conformance_";

pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

pub(crate) fn outgoing(subject: &str, body: &str, msg_id: Option<MsgId>) -> Outgoing {
    let mut headers = Headers::new();
    headers.insert("Waybill-Test", body.to_owned());
    Outgoing {
        subject: subject.to_owned(),
        msg_id,
        headers,
        payload: Bytes::from(body.to_owned()),
        due: None,
    }
}

async fn setup<T: Transport>(t: &T, ack_wait: Duration, max_deliver: u32) -> (String, T::Consumer) {
    let subject = unique(SUBJECT_PREFIX);
    let mut cfg = ConsumerConfig::new(unique("c_"), subject.clone());
    cfg.ack_wait = ack_wait;
    cfg.max_deliver = max_deliver;
    let c = t.consumer(cfg).await.unwrap();
    (subject, c)
}

pub(crate) async fn next<C: Consumer>(c: &mut C) -> C::Delivery {
    let mut batch = tokio::time::timeout(PATIENCE, c.fetch(1))
        .await
        .expect("a message should have been delivered")
        .unwrap();
    assert_eq!(batch.len(), 1, "fetch(1) returned {} messages", batch.len());
    batch.remove(0)
}

async fn nothing_for<C: Consumer>(c: &mut C, wait: Duration, why: &str) {
    if let Ok(r) = tokio::time::timeout(wait, c.fetch(1)).await {
        let got = r.unwrap();
        panic!(
            "{why}: got {:?}",
            got.iter().map(|d| d.message().payload.clone()).collect::<Vec<_>>()
        );
    }
}

/// A published message arrives with its subject, headers and body; once
/// acknowledged it is not delivered again.
pub async fn ack_settles<T: Transport>(t: &T) {
    let (subject, mut c) = setup(t, Duration::from_secs(1), 5).await;
    let ack = t.publish(outgoing(&subject, "one", None)).await.unwrap();
    assert!(!ack.duplicate);
    let d = next(&mut c).await;
    assert_eq!(d.message().subject, subject);
    assert_eq!(d.message().payload, Bytes::from_static(b"one"));
    assert_eq!(d.message().headers.get("Waybill-Test"), Some("one"));
    assert_eq!(d.delivered(), 1);
    assert_eq!(d.sequence(), ack.sequence);
    d.ack().await.unwrap();
    nothing_for(&mut c, Duration::from_millis(1500), "an acknowledged message came back").await;
}

/// A negative acknowledgement with a delay redelivers after the delay, not
/// before.
pub async fn nak_with_delay_redelivers_later<T: Transport>(t: &T) {
    let (subject, mut c) = setup(t, Duration::from_secs(5), 5).await;
    t.publish(outgoing(&subject, "later", None)).await.unwrap();
    let d = next(&mut c).await;
    d.nak(Some(Duration::from_millis(800))).await.unwrap();
    nothing_for(
        &mut c,
        Duration::from_millis(400),
        "a nak'd message came back before its delay",
    )
    .await;
    let d = next(&mut c).await;
    assert_eq!(d.delivered(), 2);
    d.ack().await.unwrap();
}

/// A delivery not acknowledged within the ack wait is delivered again; one
/// that reports progress is not.
pub async fn ack_deadline_redelivers<T: Transport>(t: &T) {
    let (subject, mut c) = setup(t, Duration::from_secs(1), 5).await;
    t.publish(outgoing(&subject, "slow", None)).await.unwrap();
    let first = next(&mut c).await;
    // Keep it alive past two ack waits by reporting progress.
    for _ in 0..3 {
        nothing_for(&mut c, Duration::from_millis(500), "redelivered despite progress").await;
        first.in_progress().await.unwrap();
    }
    drop(first); // neither acked nor nak'd: the deadline must bring it back
    let again = next(&mut c).await;
    assert_eq!(again.delivered(), 2);
    again.ack().await.unwrap();
}

/// A message is delivered at most `max_deliver` times.
pub async fn max_deliver_is_respected<T: Transport>(t: &T) {
    let (subject, mut c) = setup(t, Duration::from_secs(1), 2).await;
    t.publish(outgoing(&subject, "poison", None)).await.unwrap();
    for n in 1..=2 {
        let d = next(&mut c).await;
        assert_eq!(d.delivered(), n);
        d.nak(None).await.unwrap();
    }
    nothing_for(&mut c, Duration::from_millis(2500), "delivered past max_deliver").await;
}

/// A terminated delivery is not delivered again.
pub async fn term_stops_redelivery<T: Transport>(t: &T) {
    let (subject, mut c) = setup(t, Duration::from_secs(1), 5).await;
    t.publish(outgoing(&subject, "bad", None)).await.unwrap();
    next(&mut c).await.term().await.unwrap();
    nothing_for(&mut c, Duration::from_millis(1500), "a terminated message came back").await;
}

/// A second publish with the same message id is reported as a duplicate and
/// not stored again.
pub async fn duplicates_are_dropped<T: Transport>(t: &T) {
    let (subject, mut c) = setup(t, Duration::from_secs(5), 5).await;
    let id = unique("order:");
    let first = t
        .publish(outgoing(&subject, "a", Some(MsgId::custom(format!("{id}:0")))))
        .await
        .unwrap();
    let again = t
        .publish(outgoing(&subject, "b", Some(MsgId::custom(format!("{id}:0")))))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.sequence, first.sequence);
    let other = t
        .publish(outgoing(&subject, "c", Some(MsgId::custom(format!("{id}:1")))))
        .await
        .unwrap();
    assert!(!other.duplicate);
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let d = next(&mut c).await;
        bodies.push(d.message().payload.clone());
        d.ack().await.unwrap();
    }
    bodies.sort();
    assert_eq!(bodies, [Bytes::from_static(b"a"), Bytes::from_static(b"c")]);
    nothing_for(&mut c, Duration::from_millis(300), "a duplicate was delivered").await;
}

/// Two handles on one durable consumer share its messages: each message goes
/// to one of them, and all arrive.
pub async fn shared_consumer_splits_work<T: Transport>(t: &T) {
    let subject = unique(SUBJECT_PREFIX);
    let cfg = ConsumerConfig::new(unique("c_"), subject.clone());
    let mut a = t.consumer(cfg.clone()).await.unwrap();
    let mut b = t.consumer(cfg).await.unwrap();
    const N: usize = 200;
    for i in 0..N {
        t.publish(outgoing(&subject, &i.to_string(), None)).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut from_a = 0;
    while seen.len() < N {
        let (batch, is_a) = tokio::time::timeout(PATIENCE, async {
            tokio::select! {
                r = a.fetch(7) => (r, true),
                r = b.fetch(7) => (r, false),
            }
        })
        .await
        .expect("all messages should arrive");
        for d in batch.unwrap() {
            seen.push(d.sequence());
            if is_a {
                from_a += 1;
            }
            d.ack().await.unwrap();
        }
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), N, "a message was delivered twice or lost");
    assert!(from_a > 0 && from_a < N, "one handle got all the work");
}

/// Messages published before the consumer existed are delivered to it.
pub async fn earlier_messages_reach_a_new_consumer<T: Transport>(t: &T) {
    let subject = unique(SUBJECT_PREFIX);
    t.publish(outgoing(&subject, "early", None)).await.unwrap();
    let mut c = t.consumer(ConsumerConfig::new(unique("c_"), subject)).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.message().payload, Bytes::from_static(b"early"));
    d.ack().await.unwrap();
}

/// Every check above, in turn.
pub async fn run_all<T: Transport>(t: &T) {
    ack_settles(t).await;
    nak_with_delay_redelivers_later(t).await;
    ack_deadline_redelivers(t).await;
    max_deliver_is_respected(t).await;
    term_stops_redelivery(t).await;
    duplicates_are_dropped(t).await;
    shared_consumer_splits_work(t).await;
    earlier_messages_reach_a_new_consumer(t).await;
    join_records_are_compare_and_set(t).await;
}

/// A join's record is created once, read with its revision, and written
/// only at the revision last read: a writer that lost the race is told so
/// and changes nothing. Records of two forks of one order are apart.
pub async fn join_records_are_compare_and_set<T: Transport>(t: &T) {
    let order = crate::id::OrderId::new();
    assert_eq!(t.join_state(&order, 0).await.unwrap(), None, "no record before the fork");
    assert!(t.put_join_state(order, 0, Bytes::from_static(b"base"), 0).await.unwrap());
    assert!(
        !t.put_join_state(order, 0, Bytes::from_static(b"again"), 0).await.unwrap(),
        "a second create changes nothing"
    );
    let (bytes, first) = t.join_state(&order, 0).await.unwrap().expect("created");
    assert_eq!(&bytes[..], b"base");
    assert!(t.put_join_state(order, 0, Bytes::from_static(b"base+a"), first).await.unwrap());
    assert!(
        !t.put_join_state(order, 0, Bytes::from_static(b"base+b"), first).await.unwrap(),
        "a write at a revision read before another's loses"
    );
    let (bytes, second) = t.join_state(&order, 0).await.unwrap().unwrap();
    assert_eq!(&bytes[..], b"base+a");
    assert_ne!(second, first);
    assert_eq!(t.join_state(&order, 1).await.unwrap(), None, "another fork's record is apart");
}
