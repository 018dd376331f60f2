//! The transport conformance suite against the embedded transport, plus what
//! only the embedded transport promises (dead letters for exhausted
//! deliveries). Time is paused: waits of seconds cost nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use bytes::Bytes;
use waybill::transport::{conformance, Consumer, ConsumerConfig, Embedded, Headers, Outgoing, Transport};

#[tokio::test(start_paused = true)]
async fn ack_settles() {
    conformance::ack_settles(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn nak_with_delay_redelivers_later() {
    conformance::nak_with_delay_redelivers_later(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn ack_deadline_redelivers() {
    conformance::ack_deadline_redelivers(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn max_deliver_is_respected() {
    conformance::max_deliver_is_respected(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn term_stops_redelivery() {
    conformance::term_stops_redelivery(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn duplicates_are_dropped() {
    conformance::duplicates_are_dropped(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn shared_consumer_splits_work() {
    conformance::shared_consumer_splits_work(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn earlier_messages_reach_a_new_consumer() {
    conformance::earlier_messages_reach_a_new_consumer(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn all_checks_share_one_transport() {
    conformance::run_all(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn request_is_answered() {
    conformance::request_is_answered(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn nobody_serving_is_no_responders() {
    conformance::nobody_serving_is_no_responders(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn unanswered_request_times_out() {
    conformance::unanswered_request_times_out(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn a_group_answers_each_request_once() {
    conformance::a_group_answers_each_request_once(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn wildcards_match_tokens() {
    conformance::wildcards_match_tokens(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn request_headers_reach_the_server() {
    conformance::request_headers_reach_the_server(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn announcements_need_no_answer() {
    conformance::announcements_need_no_answer(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn the_log_reads_from_a_sequence_then_live() {
    conformance::log_reads_from_a_sequence_then_live(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn get_reads_one_message() {
    conformance::get_reads_one_message(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn consumer_position_follows_deliveries() {
    conformance::consumer_position_follows_deliveries(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn all_log_checks_share_one_transport() {
    conformance::run_all_log(&Embedded::new()).await;
}

/// On the wall clock: the coordinator tells stalls by it.
#[tokio::test]
async fn the_coordinator_tracks_and_redrives_on_the_embedded_transport() {
    conformance::coordinator_tracks_and_redrives(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn all_request_checks_share_one_transport() {
    conformance::run_all_rpc(&Embedded::new()).await;
}

#[tokio::test(start_paused = true)]
async fn a_group_takes_turns_and_bad_subjects_are_refused() {
    use waybill::transport::{Error, Request, Requests, Rpc};
    let t = Embedded::new();
    let subject = "waybill.x.turns".to_owned();
    let mut a = t.serve(std::slice::from_ref(&subject), "g").await.unwrap();
    let mut b = t.serve(std::slice::from_ref(&subject), "g").await.unwrap();
    for _ in 0..3 {
        t.announce(subject.clone(), Bytes::from_static(b"n")).await.unwrap();
    }
    // Strictly in turn: a, b, a.
    assert_eq!(a.next().await.unwrap().payload(), &Bytes::from_static(b"n"));
    assert_eq!(b.next().await.unwrap().payload(), &Bytes::from_static(b"n"));
    assert_eq!(a.next().await.unwrap().payload(), &Bytes::from_static(b"n"));
    // A dropped server is passed over: b gets the next one.
    drop(a);
    t.announce(subject.clone(), Bytes::from_static(b"m")).await.unwrap();
    assert_eq!(b.next().await.unwrap().payload(), &Bytes::from_static(b"m"));
    drop(b);
    let e = t
        .request(subject.clone(), Headers::new(), Bytes::new(), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(e, Error::NoResponders(subject));
    for bad in ["waybill..x", "waybill.x y", "", "waybill.>.x"] {
        let e = t.serve(&[bad.to_owned()], "g").await.unwrap_err();
        assert!(matches!(e, Error::BadConfig(_)), "{bad:?}: {e}");
    }
    let e = t.announce("waybill.*".into(), Bytes::new()).await.unwrap_err();
    assert!(matches!(e, Error::BadConfig(_)), "{e}");
    let e = t.serve(&["waybill.x".to_owned()], "a group").await.unwrap_err();
    assert!(matches!(e, Error::BadConfig(_)), "{e}");
}

fn msg(subject: &str, body: &'static str) -> Outgoing {
    Outgoing {
        subject: subject.into(),
        msg_id: None,
        headers: Headers::new(),
        payload: Bytes::from_static(body.as_bytes()),
        due: None,
    }
}

#[tokio::test(start_paused = true)]
async fn exhausted_deliveries_become_a_dead_letter_with_the_reason() {
    let t = Embedded::new();
    let mut cfg = ConsumerConfig::new("poison", "x.poison");
    cfg.ack_wait = Duration::from_secs(1);
    cfg.max_deliver = 3;
    let mut c = t.consumer(cfg).await.unwrap();
    t.publish(msg("x.poison", "crash me")).await.unwrap();
    for _ in 0..3 {
        // Taken and never settled, as by a worker that crashes.
        let d = c.fetch(1).await.unwrap();
        drop(d);
    }
    // Consumers notice the expired last delivery while they fetch: it is
    // not delivered a fourth time, and becomes a dead letter.
    let again = tokio::time::timeout(Duration::from_secs(5), c.fetch(1)).await;
    assert!(again.is_err(), "delivered past max_deliver");
    tokio::time::timeout(Duration::from_secs(5), t.wait_for_dead_letters(1))
        .await
        .expect("the message should be dead-lettered");
    let dead = t.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.payload, Bytes::from_static(b"crash me"));
    assert_eq!(dead[0].consumer, "poison");
    assert!(dead[0].reason.contains("delivered 3 times"), "{}", dead[0].reason);
    assert_eq!(t.consumer_stats("poison").unwrap().unacked(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_consumer_refuses_a_changed_configuration() {
    let t = Embedded::new();
    t.consumer(ConsumerConfig::new("c", "a.b")).await.unwrap();
    let e = t.consumer(ConsumerConfig::new("c", "a.c")).await.unwrap_err();
    assert!(e.to_string().contains("different configuration"), "{e}");
    let e = t.consumer(ConsumerConfig::new("d", "a.*")).await.unwrap_err();
    assert!(e.to_string().contains("filter subject"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn oversized_messages_are_refused() {
    let t = Embedded::with_config(waybill::transport::EmbeddedConfig {
        max_message_size: 8,
        ..Default::default()
    });
    let e = t.publish(msg("a.b", "far too long a message")).await.unwrap_err();
    assert!(matches!(e, waybill::transport::Error::TooLarge { .. }), "{e}");
    assert!(!e.is_retryable());
}

/// A reader that falls behind the log's capacity is told how much it lost,
/// then reads on from the oldest message kept; a new reader starting
/// before the oldest one simply starts there.
#[tokio::test(start_paused = true)]
async fn a_reader_behind_the_log_capacity_is_told_what_it_lost() {
    use waybill::transport::{EmbeddedConfig, HopLog, LogReader};
    let t = Embedded::with_config(EmbeddedConfig {
        log_capacity: 3,
        ..EmbeddedConfig::default()
    });
    let publish = |n: u32| {
        let t = t.clone();
        async move {
            t.publish(Outgoing {
                subject: "waybill.hop.cap".into(),
                msg_id: None,
                headers: Headers::new(),
                payload: bytes::Bytes::from(n.to_string()),
                due: None,
            })
            .await
            .unwrap()
            .sequence
        }
    };
    let first = publish(1).await;
    let mut reader = t.read_log(first).await.unwrap();
    assert_eq!(reader.next_batch(10).await.unwrap().len(), 1);
    for n in 2..=6 {
        publish(n).await;
    }
    let e = reader.next_batch(10).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    let seqs: Vec<u64> = reader
        .next_batch(10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.sequence)
        .collect();
    assert_eq!(seqs, [4, 5, 6]);
    let mut fresh = t.read_log(1).await.unwrap();
    let seqs: Vec<u64> = fresh.next_batch(10).await.unwrap().iter().map(|m| m.sequence).collect();
    assert_eq!(seqs, [4, 5, 6]);
    assert_eq!(t.log_info().await.unwrap().messages, 3);
}

#[tokio::test]
async fn join_records_are_compare_and_set() {
    conformance::join_records_are_compare_and_set(&Embedded::new()).await;
}
