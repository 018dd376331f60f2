//! The transport conformance suite against a real nats-server (a throwaway
//! one, started by the test), and what only the NATS transport promises:
//! refusing servers that are too old and configurations that differ.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

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
    let ack = a
        .publish(waybill::transport::Outgoing {
            subject: "waybill.hop.x.y".into(),
            msg_id: Some("m:0".into()),
            headers: waybill::transport::Headers::new(),
            payload: bytes::Bytes::from_static(b"x"),
        })
        .await
        .unwrap();
    let again = b
        .publish(waybill::transport::Outgoing {
            subject: "waybill.hop.x.y".into(),
            msg_id: Some("m:0".into()),
            headers: waybill::transport::Headers::new(),
            payload: bytes::Bytes::from_static(b"x"),
        })
        .await
        .unwrap();
    assert!(again.duplicate && again.sequence == ack.sequence);
}
