//! The transport conformance suite against a real nats-server (a throwaway
//! one, started by the test), and what only the NATS transport promises:
//! refusing servers that are too old and configurations that differ.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use waybill::transport::nats::{Nats, NatsConfig};
use waybill::transport::{conformance, ConsumerConfig, Transport};
use waybill_testkit::NatsServer;

async fn transport(server: &NatsServer) -> Nats {
    Nats::connect(&server.url(), NatsConfig::default()).await.unwrap()
}

#[tokio::test]
async fn the_conformance_suite_passes_on_nats() {
    let server = NatsServer::start();
    let t = transport(&server).await;
    conformance::run_all(&t).await;
}

#[tokio::test]
async fn the_request_and_log_checks_pass_on_nats() {
    let server = NatsServer::start();
    let t = transport(&server).await;
    conformance::run_all_rpc(&t).await;
    conformance::run_all_log(&t).await;
}

#[tokio::test]
async fn requests_between_two_connections() {
    use waybill::transport::Rpc;
    // A server on one connection, the requester on another: what the
    // coordinator and the command line are.
    let server = NatsServer::start();
    let serving = transport(&server).await;
    let asking = transport(&server).await;
    let subject = "waybill.conformance.two_connections".to_owned();
    let mut requests = serving.serve(std::slice::from_ref(&subject), "g").await.unwrap();
    let answer = tokio::spawn(async move {
        use waybill::transport::{Request, Requests};
        let r = requests.next().await.unwrap();
        r.respond(bytes::Bytes::from_static(b"pong")).await.unwrap();
    });
    // The other connection's subscription reaches the server a moment
    // after `serve` returns: until then, nobody answers.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let got = loop {
        let r = asking
            .request(
                subject.clone(),
                waybill::transport::Headers::new(),
                bytes::Bytes::from_static(b"ping"),
                std::time::Duration::from_secs(5),
            )
            .await;
        match r {
            Err(waybill::transport::Error::NoResponders(_)) if std::time::Instant::now() < deadline => continue,
            r => break r.unwrap(),
        }
    };
    assert_eq!(got, bytes::Bytes::from_static(b"pong"));
    answer.await.unwrap();
}

#[tokio::test]
async fn the_coordinator_tracks_and_redrives_on_nats() {
    let server = NatsServer::start();
    let t = transport(&server).await;
    conformance::coordinator_tracks_and_redrives(&t).await;
}

#[tokio::test]
async fn a_consumer_with_other_settings_is_refused() {
    let server = NatsServer::start();
    let t = transport(&server).await;
    t.consumer(ConsumerConfig::new("svc", "waybill.hop.svc.a"))
        .await
        .unwrap();
    let e = t
        .consumer(ConsumerConfig::new("svc", "waybill.hop.svc.b"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("consumer svc"), "{e}");
}

#[tokio::test]
async fn connecting_twice_finds_the_streams_as_configured() {
    let server = NatsServer::start();
    let a = transport(&server).await;
    let b = transport(&server).await;
    let msg = || waybill::transport::Outgoing {
        subject: "waybill.hop.x.y".into(),
        msg_id: Some(waybill::MsgId::custom("m:0")),
        headers: waybill::transport::Headers::new(),
        payload: bytes::Bytes::from_static(b"x"),
    };
    let ack = a.publish(msg()).await.unwrap();
    let again = b.publish(msg()).await.unwrap();
    assert!(again.duplicate && again.sequence == ack.sequence);
}

#[tokio::test]
async fn a_message_that_exhausts_its_deliveries_becomes_a_dead_letter() {
    use std::time::Duration;
    use waybill::transport::{Consumer, Headers, Outgoing};

    let server = NatsServer::start();
    let t = transport(&server).await;
    let mut cfg = ConsumerConfig::new("wb_poison", "waybill.hop.poison");
    cfg.ack_wait = Duration::from_secs(1);
    cfg.max_deliver = 2;
    let mut c = t.consumer(cfg).await.unwrap();
    // Dead letters are published on waybill.dlq.<service>: wait for that,
    // on a connection of the test's own.
    let raw = async_nats::connect(server.url()).await.unwrap();
    let mut dead = raw.subscribe("waybill.dlq.poison").await.unwrap();
    t.publish(Outgoing {
        subject: "waybill.hop.poison".into(),
        msg_id: None,
        headers: Headers::new(),
        payload: bytes::Bytes::from_static(b"kills its worker"),
    })
    .await
    .unwrap();
    // Taken and never settled, twice: as by a worker process that dies on it.
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(10), c.fetch(1))
            .await
            .unwrap()
            .unwrap();
        drop(d);
    }
    tokio::time::timeout(Duration::from_secs(15), futures::StreamExt::next(&mut dead))
        .await
        .expect("the exhausted message was not dead-lettered");
    let stream = async_nats::jetstream::new(raw)
        .get_stream(waybill::transport::nats::DLQ_STREAM)
        .await
        .unwrap();
    let m = stream.get_raw_message(1).await.unwrap();
    assert_eq!(m.subject.as_str(), "waybill.dlq.poison");
    assert_eq!(m.payload.as_ref(), b"kills its worker");
    let reason = m.headers.get(waybill::headers::DLQ_REASON).unwrap().to_string();
    assert!(reason.contains("delivered 2 times"), "{reason}");
    assert_eq!(t.dead_letter_count().await.unwrap(), 1, "stored once");
}

#[tokio::test]
async fn a_missing_key_value_bucket_is_told_apart_from_an_absent_server() {
    use async_nats::jetstream::kv;
    use waybill::transport::Error;

    let server = NatsServer::start();
    let t = transport(&server).await;
    let e = t.key_value("nosuch").await.unwrap_err();
    assert!(matches!(e, Error::BadConfig(_)), "{e:?}");
    assert!(!e.is_retryable());
    let created = t
        .create_key_value(kv::Config {
            bucket: "there".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    created.put("k", "v".into()).await.unwrap();
    let opened = t.key_value("there").await.unwrap();
    assert_eq!(opened.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));

    // No server: the look-up goes unanswered (the client's request time-out,
    // 10 s).
    drop(server);
    let e = t.key_value("there").await.unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
}
