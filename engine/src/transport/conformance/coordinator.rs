//! The coordinator, written once above the seam, on this transport.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;

use super::{next, PATIENCE};
use crate::transport::{ConsumerConfig, Delivery, HopLog, Rpc};

/// The payload of the coordinator's check.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Note {
    text: String,
}

impl crate::WorkflowPayload for Note {
    fn validate(&self) -> Result<(), crate::InvalidPayload> {
        if self.text.is_empty() {
            return Err(crate::InvalidPayload::new("text", "must not be empty"));
        }
        Ok(())
    }
}

/// A coordinator on this transport starts an order asked of it, tracks it
/// through its hops, re-drives the hop a consumer passed without a next
/// hop (a lost hop), and answers status and orders requests with what
/// happened. Runs one coordinator: call it once per transport.
pub async fn coordinator_tracks_and_redrives<T: HopLog + Rpc>(t: &T) {
    use crate::coordinator::api::OrdersQuery;
    use crate::coordinator::{self, CoordinatorClient, CoordinatorConfig};
    use crate::{Client, Registry, ServiceSubject, StepOutput, Worker, Workflow};
    use std::sync::Arc;

    let tag = uuid::Uuid::now_v7().simple().to_string();
    let (svc_a, svc_b) = (format!("conformance_{tag}.a"), format!("conformance_{tag}.b"));
    let wf = Workflow::builder(format!("conf{}", &tag[..12]), 1)
        .step("a", svc_a.as_str())
        .step("b", svc_b.as_str())
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut registry = Registry::new();
    registry.register::<Note>(wf.clone());
    let config = CoordinatorConfig {
        stall_grace: Duration::from_millis(200),
        check_every: Duration::from_millis(100),
        ..CoordinatorConfig::default()
    };
    let coordinator = coordinator::start(t.clone(), Some(Arc::new(registry)), config)
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, coordinator.caught_up())
        .await
        .expect("the coordinator should catch up with the log");
    let asks = CoordinatorClient::new(t.clone(), PATIENCE);
    let client = Client::connect(t.clone()).await.unwrap();
    let ok = |_ctx: crate::StepContext, _p: crate::Payload| async { Ok(StepOutput::ok()) };
    let worker_a = Worker::builder(t.clone())
        .serve(svc_a.as_str(), ok)
        .start()
        .await
        .unwrap();

    // Step b's hop is taken and settled by a process that then vanishes
    // without handing anything on: lost, unless re-driven.
    let b = ServiceSubject::new(svc_b.as_str()).unwrap();
    let mut thief = t
        .consumer(ConsumerConfig::new(
            crate::subject::service_consumer(&b),
            crate::subject::hop(&b),
        ))
        .await
        .unwrap();
    let started = asks
        .start(
            wf.name().as_str(),
            None,
            Bytes::from_static(br#"{"text":"lost and found"}"#),
        )
        .await
        .unwrap();
    let lost = next(&mut thief).await;
    lost.ack().await.unwrap();
    drop(thief);
    let done = client.wait(started.id);
    let worker_b = Worker::builder(t.clone())
        .serve(svc_b.as_str(), ok)
        .start()
        .await
        .unwrap();
    let doc = tokio::time::timeout(PATIENCE, done)
        .await
        .expect("the re-driven order should finish")
        .unwrap();
    assert_eq!(doc.status, crate::Status::Completed);

    let last = t.log_info().await.unwrap().last_sequence;
    let orders = asks
        .orders(&OrdersQuery {
            after: Some(last),
            ..OrdersQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        orders.summary.finished.get(&crate::Status::Completed),
        Some(&1),
        "{orders:?}"
    );
    assert!(orders.feeds.iter().map(|f| f.redriven).sum::<u64>() >= 1, "{orders:?}");
    let status = asks.status(&started.id).await.unwrap();
    assert_eq!(status.status, crate::Status::Completed);
    let steps: Vec<&str> = status.history.iter().map(|h| h.step.as_str()).collect();
    assert_eq!(steps, ["a", "b"], "{status:?}");
    let unknown = asks.status(&crate::OrderId::new()).await.unwrap_err();
    assert!(!unknown.is_retryable(), "{unknown}");

    worker_a.shutdown().await;
    worker_b.shutdown().await;
    client.close().await;
    coordinator.shutdown().await;
}
