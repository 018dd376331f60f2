//! `Client::start` through an outage: the embedded transport behind a
//! wrapper that fails the first hops' publishes as a server restart or a
//! leader election would (not stored; or stored, but the answer lost). The
//! start retries under its one id: every order is stored exactly once and
//! completes; a refusal for cause is returned at once; an outage longer
//! than the start's deadline ends in `NotStored`, naming the id.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use waybill::transport::{Embedded, Error};
use waybill::{Client, Payload, StartError, Status, StepOutput, Worker, Workflow};

const DEADLINE: Duration = Duration::from_secs(20);

mod common;
use common::{Faulty, PublishFault};

/// What the next publishes of a first hop (deduplication id `<id>:0`) do.
#[derive(Debug, Clone)]
enum Fault {
    /// Not stored; this error comes back.
    Refuse(Error),
    /// Stored, but the answer is lost: this error comes back.
    StoreThenFail(Error),
}

/// The embedded transport with scripted faults on first hops. Other
/// messages (the workers' hops) pass untouched.
#[derive(Clone)]
struct Flaky {
    transport: Faulty,
    /// Faults for the next first-hop publishes, in order; then every
    /// publish passes (or, with `always`, every one fails so).
    script: Arc<Mutex<Vec<Fault>>>,
    always: Arc<Mutex<Option<Fault>>>,
    first_hop_publishes: Arc<AtomicU32>,
}

impl Flaky {
    fn new(script: Vec<Fault>) -> Self {
        let script = Arc::new(Mutex::new(script));
        let always: Arc<Mutex<Option<Fault>>> = Arc::new(Mutex::new(None));
        let first_hop_publishes = Arc::new(AtomicU32::new(0));
        let (sc, a, n) = (script.clone(), always.clone(), first_hop_publishes.clone());
        let transport = Faulty::new(Embedded::new(), move |msg| {
            if !msg.msg_id.as_ref().is_some_and(|id| id.to_string().ends_with(":0")) {
                return PublishFault::Pass;
            }
            n.fetch_add(1, Ordering::SeqCst);
            let mut s = sc.lock().unwrap();
            let next = if s.is_empty() {
                a.lock().unwrap().clone()
            } else {
                Some(s.remove(0))
            };
            match next {
                Some(Fault::Refuse(e)) => PublishFault::Refuse(e),
                Some(Fault::StoreThenFail(e)) => PublishFault::StoreThenFail(e),
                None => PublishFault::Pass,
            }
        });
        Self {
            transport,
            script,
            always,
            first_hop_publishes,
        }
    }
}

fn one_step() -> Workflow {
    Workflow::builder("retry", 1)
        .step("only", "retry.only")
        .build()
        .unwrap()
}

fn timed_out() -> Error {
    Error::TimedOut("didn't receive ack in time".into())
}

/// As a publish during a leader election fails (retryable).
fn no_stream() -> Error {
    Error::Other {
        message: "publish was not acknowledged: no stream found for given subject".into(),
        retryable: true,
    }
}

async fn worker(t: &Flaky) -> waybill::WorkerHandle {
    Worker::builder(t.transport.clone())
        .serve("retry.only", |_ctx, _p: Payload| async { Ok(StepOutput::ok()) })
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_and_unstored_starts_are_retried_under_one_id_and_stored_once() {
    // Order 1: two tries not stored (a time-out, no stream during an
    // election), then stored. Order 2: stored, but the answer lost, twice:
    // its retries are duplicates of the first try. Order 3: no fault.
    let t = Flaky::new(vec![Fault::Refuse(timed_out()), Fault::Refuse(no_stream())]);
    let w = worker(&t).await;
    let client = Client::connect(t.transport.clone()).await.unwrap();
    let wf = one_step();
    let stored_before = t.transport.inner.stored();

    let first = client.start(&wf, Payload::postcard(&1u8).unwrap()).await.unwrap();
    assert_eq!(t.first_hop_publishes.load(Ordering::SeqCst), 3);
    *t.script.lock().unwrap() = vec![
        Fault::StoreThenFail(timed_out()),
        Fault::StoreThenFail(Error::Other {
            message: "connection lost".into(),
            retryable: true,
        }),
    ];
    let id = waybill::OrderId::new();
    let ack = client
        .start_with_id(id, &wf, Payload::postcard(&2u8).unwrap())
        .await
        .unwrap();
    assert!(ack.duplicate, "the retry found the first try stored");
    assert_eq!(t.first_hop_publishes.load(Ordering::SeqCst), 6);
    let third = client.start(&wf, Payload::postcard(&3u8).unwrap()).await.unwrap();
    assert_eq!(t.first_hop_publishes.load(Ordering::SeqCst), 7);

    for order in [first, id, third] {
        let doc = tokio::time::timeout(DEADLINE, client.wait(order))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
        assert_eq!(doc.history.len(), 1, "one step ran once: {}", doc.journal());
    }
    // Three first hops, three done hops: nothing stored twice.
    assert_eq!(t.transport.inner.stored() - stored_before, 6);
    w.shutdown().await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_returned_at_once_and_an_outage_past_the_deadline_names_the_id() {
    let t = Flaky::new(vec![Fault::Refuse(Error::TooLarge { size: 10, max: 1 })]);
    let client = Client::connect(t.transport.clone()).await.unwrap();
    let wf = one_step();

    let e = client.start(&wf, Payload::postcard(&1u8).unwrap()).await.unwrap_err();
    assert!(matches!(e, StartError::Transport(Error::TooLarge { .. })), "{e:?}");
    assert!(!e.is_retryable() && e.order_id().is_none());
    assert_eq!(t.first_hop_publishes.load(Ordering::SeqCst), 1, "not retried");

    // Nothing stored for longer than the start may take.
    *t.always.lock().unwrap() = Some(Fault::Refuse(no_stream()));
    let client = client.start_timeout(Duration::from_millis(400));
    let began = Instant::now();
    let id = waybill::OrderId::new();
    let e = client
        .start_with_id(id, &wf, Payload::postcard(&2u8).unwrap())
        .await
        .unwrap_err();
    let took = began.elapsed();
    let StartError::NotStored {
        id: named,
        tries,
        ref source,
        ..
    } = e
    else {
        panic!("expected NotStored, got {e:?}");
    };
    assert_eq!(named, id);
    assert_eq!(source, &no_stream());
    assert!(e.is_retryable() && e.order_id() == Some(id));
    assert!((3..=8).contains(&tries), "{tries} tries in {took:?}");
    assert!(took < Duration::from_millis(400), "gave up by the deadline: {took:?}");
    assert_eq!(t.first_hop_publishes.load(Ordering::SeqCst), 1 + tries);
    assert!(e.to_string().contains(&id.to_string()), "{e}");

    // The outage over, the same id goes through and is stored once.
    *t.always.lock().unwrap() = None;
    let stored = t.transport.inner.stored();
    let ack = client
        .start_with_id(id, &wf, Payload::postcard(&2u8).unwrap())
        .await
        .unwrap();
    assert!(!ack.duplicate);
    assert_eq!(t.transport.inner.stored(), stored + 1);

    // The timeout is capped inside the stream's duplicate window.
    assert!(waybill::MAX_START_TIMEOUT < waybill::transport::NatsConfig::default().duplicate_window);
}
