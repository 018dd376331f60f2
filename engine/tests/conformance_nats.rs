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
        due: None,
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
        due: None,
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

/// Fetches one delivery, waiting at most `within` for it.
async fn one<C: waybill::transport::Consumer>(c: &mut C, within: std::time::Duration) -> C::Delivery {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut got = tokio::time::timeout(left, c.fetch(1))
            .await
            .expect("a delivery within the deadline")
            .unwrap();
        if let Some(d) = got.pop() {
            return d;
        }
    }
}

#[tokio::test]
async fn a_hop_not_due_is_kept_by_the_server_until_it_is() {
    use std::time::Duration;
    use waybill::transport::{Consumer, Delivery, Due, Headers, HopLog, Outgoing};
    use waybill::{MsgId, OrderId, Timestamp};

    let server = NatsServer::start();
    let t = transport(&server).await;
    let mut c = t
        .consumer(ConsumerConfig::new("wb_timed", "waybill.hop.timed"))
        .await
        .unwrap();
    let order = OrderId::new();
    let at = Timestamp::now().plus(Duration::from_secs(2));
    let msg = || {
        let mut headers = Headers::new();
        headers.insert("Waybill-Test", "later".to_owned());
        Outgoing {
            subject: "waybill.hop.timed".into(),
            msg_id: Some(MsgId::custom("timed:1")),
            headers,
            payload: bytes::Bytes::from_static(b"due in 2 s"),
            due: Some(Due { at, order, branch: None }),
        }
    };
    let ack = t.publish(msg()).await.unwrap();
    // Kept as the order's timer, once: the same publish again is a duplicate.
    let stored = t.get(ack.sequence).await.unwrap().expect("the timer is stored");
    assert_eq!(stored.message.subject, waybill::subject::timer(&order));
    assert!(t.publish(msg()).await.unwrap().duplicate);

    let d = one(&mut c, Duration::from_secs(15)).await;
    let now = Timestamp::now();
    assert!(now >= at, "delivered {:?} before it was due", at.since(now));
    assert_eq!(d.message().subject, "waybill.hop.timed");
    assert_eq!(d.message().payload, bytes::Bytes::from_static(b"due in 2 s"));
    assert_eq!(d.message().headers.get("Waybill-Test"), Some("later"));
    assert!(
        d.message()
            .headers
            .iter()
            .all(|(name, _)| !waybill::headers::is_schedule_header(name)),
        "the server's scheduling headers are not passed on: {:?}",
        d.message().headers
    );
    assert_eq!(d.delivered(), 1);
    d.ack().await.unwrap();
    // It fired once.
    if let Ok(Ok(more)) = tokio::time::timeout(Duration::from_millis(1500), c.fetch(1)).await {
        assert!(more.is_empty(), "the timer fired again");
    }
}

#[tokio::test]
async fn a_hop_due_soon_is_published_at_once() {
    use std::time::Duration;
    use waybill::transport::{Due, Headers, HopLog, Outgoing};
    use waybill::{OrderId, Timestamp};

    let server = NatsServer::start();
    let t = transport(&server).await;
    let ack = t
        .publish(Outgoing {
            subject: "waybill.hop.soon".into(),
            msg_id: None,
            headers: Headers::new(),
            payload: bytes::Bytes::from_static(b"a retry's short backoff"),
            due: Some(Due {
                at: Timestamp::now().plus(Duration::from_millis(100)),
                order: OrderId::new(),
                branch: None,
            }),
        })
        .await
        .unwrap();
    let stored = t.get(ack.sequence).await.unwrap().expect("stored");
    assert_eq!(stored.message.subject, "waybill.hop.soon");
}

#[tokio::test]
async fn a_hops_stream_made_before_timers_gets_them_from_setup() {
    use async_nats::jetstream::stream;
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(stream::Config {
        name: "WAYBILL_HOPS".into(),
        subjects: vec!["waybill.hop.>".into(), "waybill.done.>".into()],
        storage: stream::StorageType::File,
        duplicate_window: std::time::Duration::from_secs(120),
        max_age: std::time::Duration::from_secs(3600),
        ..Default::default()
    })
    .await
    .unwrap();
    let _t = transport(&server).await;
    let got = js
        .get_stream("WAYBILL_HOPS")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert!(got.allow_message_schedules);
    assert_eq!(got.subjects, waybill::subject::hops_stream());
    assert_eq!(got.max_age, std::time::Duration::from_secs(3600), "the rest is kept");
}
