//! The stream read as a log ([`HopLog`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;

use super::{next, outgoing, unique, PATIENCE, SUBJECT_PREFIX};
use crate::transport::{ConsumerConfig, Delivery, HopLog, LogReader, Stored};

/// Reads from `reader` until it has returned every message of `subject`
/// in `want` (sequences), in order; other checks' messages are skipped.
async fn read_subject<R: LogReader>(reader: &mut R, subject: &str, want: &[u64]) -> Vec<Stored> {
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while got.len() < want.len() {
            for m in reader.next_batch(64).await.unwrap() {
                if m.message.subject == subject {
                    got.push(m);
                }
            }
        }
    })
    .await
    .expect("the log should have returned every message published");
    assert_eq!(got.iter().map(|m| m.sequence).collect::<Vec<_>>(), want);
    got
}

/// The log reads in order from a given sequence, and then goes on with the
/// messages stored later, as they come.
pub async fn log_reads_from_a_sequence_then_live<T: HopLog>(t: &T) {
    let subject = unique(SUBJECT_PREFIX);
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(
            t.publish(outgoing(&subject, &format!("m{i}"), None))
                .await
                .unwrap()
                .sequence,
        );
    }
    let info = t.log_info().await.unwrap();
    assert!(info.last_sequence >= seqs[4] && info.messages >= 5, "{info:?}");
    let mut reader = t.read_log(seqs[2]).await.unwrap();
    let got = read_subject(&mut reader, &subject, &seqs[2..]).await;
    assert_eq!(got[0].message.payload, Bytes::from_static(b"m2"));
    assert_eq!(got[0].message.headers.get("Waybill-Test"), Some("m2"));
    let later = t.publish(outgoing(&subject, "later", None)).await.unwrap().sequence;
    let got = read_subject(&mut reader, &subject, &[later]).await;
    assert_eq!(got[0].message.payload, Bytes::from_static(b"later"));
}

/// One message is read by its sequence, with its subject, headers, body and
/// the time it was stored; a sequence never stored is `None`.
pub async fn get_reads_one_message<T: HopLog>(t: &T) {
    let subject = unique(SUBJECT_PREFIX);
    let before = crate::document::Timestamp::now();
    let seq = t.publish(outgoing(&subject, "one", None)).await.unwrap().sequence;
    let m = t.get(seq).await.unwrap().expect("a stored message");
    assert_eq!(m.sequence, seq);
    assert_eq!(m.message.subject, subject);
    assert_eq!(m.message.payload, Bytes::from_static(b"one"));
    assert_eq!(m.message.headers.get("Waybill-Test"), Some("one"));
    // Clocks of a server and this process may differ a little.
    let slack = 5_000_000;
    assert!(m.stored_at.0 + slack >= before.0 && m.stored_at.0 <= crate::document::Timestamp::now().0 + slack);
    assert_eq!(t.get(seq + 1_000_000).await.unwrap(), None);
}

/// A consumer's position: what it delivered, and its ack floor once the
/// deliveries are settled; no position for a consumer that does not exist.
pub async fn consumer_position_follows_deliveries<T: HopLog>(t: &T) {
    let subject = unique(SUBJECT_PREFIX);
    let durable = unique("c_");
    let mut cfg = ConsumerConfig::new(durable.clone(), subject.clone());
    cfg.ack_wait = Duration::from_secs(30);
    let mut c = t.consumer(cfg).await.unwrap();
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(
            t.publish(outgoing(&subject, &format!("p{i}"), None))
                .await
                .unwrap()
                .sequence,
        );
    }
    let mut held = Vec::new();
    while held.len() < 3 {
        held.push(next(&mut c).await);
    }
    let p = t
        .consumer_position(&durable)
        .await
        .unwrap()
        .expect("the consumer exists");
    assert_eq!(p.delivered, seqs[2], "{p:?}");
    assert!(p.ack_floor < seqs[0], "nothing is acknowledged yet: {p:?}");
    assert_eq!(p.pending, 0, "{p:?}");
    for d in held {
        d.ack().await.unwrap();
    }
    // A server settles acknowledgements on its own time: look until the
    // floor shows them, within the checks' patience.
    let mut look = tokio::time::interval(Duration::from_millis(20));
    let p = tokio::time::timeout(PATIENCE, async {
        loop {
            look.tick().await;
            let p = t
                .consumer_position(&durable)
                .await
                .unwrap()
                .expect("the consumer exists");
            if p.ack_floor >= seqs[2] {
                return p;
            }
        }
    })
    .await
    .expect("the ack floor should pass every acknowledged delivery");
    assert_eq!(p.delivered, seqs[2], "{p:?}");
    assert_eq!(t.consumer_position(&unique("none_")).await.unwrap(), None);
}

pub async fn run_all_log<T: HopLog>(t: &T) {
    log_reads_from_a_sequence_then_live(t).await;
    get_reads_one_message(t).await;
    consumer_position_follows_deliveries(t).await;
}
