//! An unavailable infrastructure delays an order; it never changes how the
//! order ends. On the embedded transport: handlers whose store is "down",
//! and a transport that cannot store hops for a while. Every wait has a
//! deadline and waits on an event (a handler's call count, a dead letter).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use waybill::transport::{DeadLetterKind, Embedded, Error as TransportError, Transport};
use waybill::{
    AttemptResult, Backoff, Client, Document, Payload, Registry, Status, StepContext, StepError, StepKind, StepOutput,
    Then, Worker, WorkerHandle, Workflow,
};

const DEADLINE: Duration = Duration::from_secs(20);

mod common;
use common::{Faulty, PublishFault};

/// A store the handlers use, which the test takes down and brings back.
/// Every call is counted and announced, so the test waits on calls.
#[derive(Clone)]
struct Store {
    down: Arc<AtomicBool>,
    calls: Arc<watch::Sender<u32>>,
    effects: Arc<AtomicU32>,
}

impl Store {
    fn new(down: bool) -> Self {
        Self {
            down: Arc::new(AtomicBool::new(down)),
            calls: Arc::new(watch::channel(0).0),
            effects: Arc::new(AtomicU32::new(0)),
        }
    }

    fn call(&self) -> Result<(), StepError> {
        self.calls.send_modify(|n| *n += 1);
        if self.down.load(Ordering::SeqCst) {
            return Err(StepError::unavailable("store: no responders"));
        }
        self.effects.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn wait_calls(&self, n: u32) {
        let mut rx = self.calls.subscribe();
        tokio::time::timeout(DEADLINE, rx.wait_for(|c| *c >= n))
            .await
            .expect("the handler should be tried again and again")
            .unwrap();
    }
}

/// `charge` then `ship`; `ship` can fail for good, which compensates
/// `charge` through `refund`. Retry budgets are tiny (3 attempts, 5 ms),
/// so anything that spent attempts on an outage would end the order.
fn workflow() -> Workflow {
    Workflow::builder("shop", 1)
        .step("charge", "s.charge")
        .compensate("s.refund")
        .retry(Backoff::fixed(3, Duration::from_millis(5)))
        .step("ship", "s.ship")
        .retry(Backoff::fixed(3, Duration::from_millis(5)))
        .on("refused", Then::Fail)
        .build()
        .unwrap()
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Order {
    ship: bool,
}

impl waybill::WorkflowPayload for Order {
    fn validate(&self) -> Result<(), waybill::InvalidPayload> {
        Ok(())
    }
}

struct Stack<T: Transport> {
    client: Client<T>,
    worker: WorkerHandle,
    registry: Registry,
}

impl<T: Transport> Stack<T> {
    async fn new(transport: T, charge: Store, refund: Store, limit: Option<Duration>) -> Self {
        let mut b = Worker::builder(transport.clone())
            .max_deliver(3)
            .ack_wait(Duration::from_millis(600))
            .serve("s.charge", move |_ctx: StepContext, _p: Payload| {
                let store = charge.clone();
                async move {
                    store.call()?;
                    Ok(StepOutput::ok())
                }
            })
            .serve("s.refund", move |_ctx: StepContext, _p: Payload| {
                let store = refund.clone();
                async move {
                    store.call()?;
                    Ok(StepOutput::ok())
                }
            })
            .serve("s.ship", |_ctx: StepContext, p: Payload| async move {
                let o: Order = p.decode()?;
                Ok(StepOutput::outcome(if o.ship { "ok" } else { "refused" }))
            });
        if let Some(limit) = limit {
            b = b.unavailable_limit(limit);
        }
        let worker = b.start().await.unwrap();
        let client = Client::connect(transport).await.unwrap();
        let mut registry = Registry::new();
        registry.register::<Order>(workflow());
        Self {
            client,
            worker,
            registry,
        }
    }

    async fn start(&self, ship: bool) -> waybill::OrderId {
        let (wf, payload) = self.registry.prepare("shop", &Order { ship }).unwrap();
        self.client.start(&wf, payload).await.unwrap()
    }

    async fn finish(&self, id: waybill::OrderId) -> Arc<Document> {
        tokio::time::timeout(DEADLINE, self.client.wait(id))
            .await
            .expect("the order should finish")
            .unwrap()
    }

    async fn stop(self) {
        self.worker.shutdown().await;
        self.client.close().await;
    }
}

/// The wait records of a history: (step, kind, attempt, tries).
fn waits(doc: &Document) -> Vec<(String, StepKind, u32, u32)> {
    doc.history
        .iter()
        .filter_map(|r| match &r.result {
            AttemptResult::Unavailable { tries, .. } => Some((r.step.to_string(), r.kind, r.attempt, *tries)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn an_unavailable_store_delays_an_order_past_its_retry_budget_and_it_completes() {
    let charge = Store::new(true);
    let stack = Stack::new(Embedded::new(), charge.clone(), Store::new(false), None).await;
    let id = stack.start(true).await;
    // Three attempts would have been spent by the third try; wait for far
    // more tries than that while the store stays down.
    charge.wait_calls(6).await;
    assert_eq!(charge.effects.load(Ordering::SeqCst), 0);
    charge.down.store(false, Ordering::SeqCst);
    let doc = stack.finish(id).await;
    assert_eq!(doc.status, Status::Completed, "{:?}\n{}", doc.failure, doc.journal());
    assert_eq!(charge.effects.load(Ordering::SeqCst), 1, "charged once");
    let w = waits(&doc);
    assert_eq!(w.len(), 1, "the tries fold into one record: {}", doc.journal());
    assert_eq!((w[0].0.as_str(), w[0].1, w[0].2), ("charge", StepKind::Forward, 1));
    assert!(w[0].3 >= 6, "{} tries recorded", w[0].3);
    // After the wait the step ran as its first attempt: none was spent.
    let charge_runs: Vec<u32> = doc
        .history
        .iter()
        .filter(|r| r.step.as_str() == "charge" && !r.result.is_unavailable())
        .map(|r| r.attempt)
        .collect();
    assert_eq!(charge_runs, [1]);
    assert!(doc.journal().to_string().contains("unavailable"), "{}", doc.journal());
    stack.stop().await;
}

#[tokio::test]
async fn an_unavailable_store_during_compensation_delays_it_and_it_compensates() {
    let refund = Store::new(true);
    let stack = Stack::new(Embedded::new(), Store::new(false), refund.clone(), None).await;
    let id = stack.start(false).await;
    refund.wait_calls(6).await;
    refund.down.store(false, Ordering::SeqCst);
    let doc = stack.finish(id).await;
    assert_eq!(doc.status, Status::Compensated, "{}", doc.journal());
    assert_eq!(refund.effects.load(Ordering::SeqCst), 1, "refunded once");
    assert!(doc.owed.is_empty());
    let w = waits(&doc);
    assert_eq!(w.len(), 1, "{}", doc.journal());
    assert_eq!((w[0].0.as_str(), w[0].1), ("charge", StepKind::Compensation));
    stack.stop().await;
}

#[tokio::test]
async fn past_the_operators_limit_the_hop_is_a_dead_letter_of_kind_unavailable_not_a_failure() {
    let charge = Store::new(true);
    let transport = Embedded::new();
    let stack = Stack::new(
        transport.clone(),
        charge.clone(),
        Store::new(false),
        Some(Duration::from_millis(300)),
    )
    .await;
    let id = stack.start(true).await;
    let letter = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(l) = transport.dead_letters().into_iter().next() {
                return l;
            }
            // Each try is a call: wait for the next one rather than poll.
            let seen = *charge.calls.borrow();
            charge.wait_calls(seen + 1).await;
        }
    })
    .await
    .expect("the hop should become a dead letter past the limit");
    assert_eq!(letter.kind, DeadLetterKind::Unavailable);
    assert!(
        letter.reason.starts_with("unavailable: store: no responders"),
        "{}",
        letter.reason
    );
    // The order did not fail: nothing finished it.
    let doc = waybill::Codec::default()
        .decode_as(
            &letter.message.payload,
            letter.message.headers.get(waybill::headers::CONTENT_TYPE),
        )
        .unwrap();
    assert_eq!(doc.id, id);
    assert_eq!(doc.status, Status::Running);
    assert!(doc.waiting().is_some(), "{}", doc.journal());
    assert!(tokio::time::timeout(Duration::from_millis(50), stack.client.wait(id))
        .await
        .is_err());
    stack.stop().await;
}

#[tokio::test]
async fn a_hop_that_cannot_be_stored_is_tried_again_without_spending_deliveries() {
    // Hops cannot be stored while `down` is set (a stream electing its
    // leader): publishes fail as unavailable.
    let embedded = Embedded::new();
    let down = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(watch::channel(0u32).0);
    let (d, r) = (down.clone(), refused.clone());
    let outage = Faulty::new(embedded.clone(), move |_| {
        if d.load(Ordering::SeqCst) {
            r.send_modify(|n| *n += 1);
            PublishFault::Refuse(TransportError::Unavailable("no stream found for given subject".into()))
        } else {
            PublishFault::Pass
        }
    });
    let charge = Store::new(false);
    let stack = Stack::new(outage, charge.clone(), Store::new(false), None).await;
    down.store(true, Ordering::SeqCst);
    // The start itself is not stored yet either: start it on the inner
    // transport, as a client on a node still up would.
    let client = Client::connect(embedded.clone()).await.unwrap();
    let (wf, payload) = stack.registry.prepare("shop", &Order { ship: true }).unwrap();
    let id = client.start(&wf, payload).await.unwrap();
    // The worker ran the charge and now cannot store its next hop. The
    // consumer allows 3 deliveries: handing the input back on every failed
    // publish would have made it a dead letter long before 7 refusals.
    let mut refused = refused.subscribe();
    tokio::time::timeout(DEADLINE, refused.wait_for(|n| *n >= 7))
        .await
        .expect("the worker should keep trying to store the hop")
        .unwrap();
    down.store(false, Ordering::SeqCst);
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    assert_eq!(charge.effects.load(Ordering::SeqCst), 1, "charged once");
    assert!(embedded.dead_letters().is_empty(), "{:?}", embedded.dead_letters());
    client.close().await;
    stack.stop().await;
}
