//! The worker runtime and the client on the embedded transport: the tier of
//! tests that needs no server. Every wait has a deadline; durations are
//! milliseconds (retry due-times are wall-clock, as they travel between
//! hosts, so these tests run in real time).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use waybill::transport::{DeadLetter, Embedded, Error as TransportError, Headers, Outgoing, Transport};
use waybill::{
    headers, subject, AttemptResult, Client, Codec, Document, Format, OrderId, Payload, Registry, Status, StepContext,
    StepError, StepKind, StepOutput, Worker, WorkerBuilder, WorkerError, WorkerHandle, Workflow, WorkflowName,
};

const DEADLINE: Duration = Duration::from_secs(10);

mod common;
use common::{
    approval, counted, gated, must_not_remind, ok, reminder, script, serve, serve_reminder, serve_two_approvals,
    three_steps, two_approvals, Faulty, Log, PublishFault, Script,
};

struct Harness {
    transport: Embedded,
    client: Client<Embedded>,
    worker: Option<WorkerHandle>,
    log: Arc<Log>,
    registry: Registry,
}

impl Harness {
    async fn new() -> Self {
        Self::with(|b| b).await
    }

    async fn with(configure: impl FnOnce(WorkerBuilder<Embedded>) -> WorkerBuilder<Embedded>) -> Self {
        let transport = Embedded::new();
        let log = Arc::new(Log::default());
        let worker = configure(serve(Worker::builder(transport.clone()), &log))
            .start()
            .await
            .unwrap();
        let client = Client::connect(transport.clone()).await.unwrap();
        let mut registry = Registry::new();
        registry.register::<Script>(three_steps());
        Self {
            transport,
            client,
            worker: Some(worker),
            log,
            registry,
        }
    }

    async fn start(&self, s: &Script) -> OrderId {
        let (wf, payload) = self.registry.prepare("trip", s).unwrap();
        self.client.start(&wf, payload).await.unwrap()
    }

    /// Starts an order and waits for its end: the one check most tests use.
    async fn check(&self, s: &Script, want: Status) -> Arc<Document> {
        let id = self.start(s).await;
        let doc = self.finish(id).await;
        assert_eq!(
            doc.status, want,
            "order {} ended {}: {:?}",
            s.name, doc.status, doc.failure
        );
        doc
    }

    async fn finish(&self, id: OrderId) -> Arc<Document> {
        tokio::time::timeout(DEADLINE, self.client.wait(id))
            .await
            .expect("the order should finish")
            .unwrap()
    }

    async fn stop(mut self) {
        if let Some(w) = self.worker.take() {
            w.shutdown().await;
        }
        self.client.close().await;
    }
}

fn steps(doc: &Document) -> Vec<(String, StepKind, u32)> {
    doc.history
        .iter()
        .map(|r| (r.step.to_string(), r.kind, r.attempt))
        .collect()
}

use StepKind::{Compensation as Undo, Forward as Fwd};

fn s(name: &str, kind: StepKind, attempt: u32) -> (String, StepKind, u32) {
    (name.into(), kind, attempt)
}

#[tokio::test]
async fn happy_path_runs_every_step_once_and_records_it() {
    let h = Harness::new().await;
    let doc = h.check(&script("ok"), Status::Completed).await;
    assert_eq!(steps(&doc), [s("a", Fwd, 1), s("b", Fwd, 1), s("c", Fwd, 1)]);
    assert_eq!(doc.hop, 3, "three hops after the start");
    assert_eq!(doc.detail_of("a"), Some("a for ok"));
    assert!(doc.owed.is_empty());
    assert!(doc
        .history
        .iter()
        .all(|r| r.ended_at >= r.started_at && !r.worker.as_str().is_empty()));
    let keys: Vec<String> = h.log.calls.lock().unwrap().iter().map(|c| c.2.clone()).collect();
    assert_eq!(
        keys,
        [
            format!("{}:a", doc.id),
            format!("{}:b", doc.id),
            format!("{}:c", doc.id)
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn transient_errors_are_retried_with_the_same_idempotency_key() {
    let h = Harness::new().await;
    let doc = h
        .check(
            &Script {
                b_flaky: 2,
                ..script("flaky")
            },
            Status::Completed,
        )
        .await;
    assert_eq!(
        steps(&doc),
        [
            s("a", Fwd, 1),
            s("b", Fwd, 1),
            s("b", Fwd, 2),
            s("b", Fwd, 3),
            s("c", Fwd, 1)
        ]
    );
    assert!(
        matches!(&doc.history[1].result, AttemptResult::Error { transient: true, message } if message.contains("attempt 1"))
    );
    let calls = h.log.calls.lock().unwrap().clone();
    let b_keys: Vec<&String> = calls.iter().filter(|c| c.0 == "b").map(|c| &c.2).collect();
    assert_eq!(b_keys.len(), 3);
    assert!(b_keys.iter().all(|k| **k == format!("{}:b", doc.id)));
    // The retries waited their backoff.
    assert!(doc.history[2].started_at.since(doc.history[1].ended_at) >= Duration::from_millis(5));
    h.stop().await;
}

#[tokio::test]
async fn a_late_permanent_failure_compensates_newest_first() {
    let h = Harness::new().await;
    let doc = h
        .check(
            &Script {
                c_fails: true,
                ..script("late")
            },
            Status::Compensated,
        )
        .await;
    assert_eq!(
        steps(&doc),
        [
            s("a", Fwd, 1),
            s("b", Fwd, 1),
            s("c", Fwd, 1),
            s("b", Undo, 1),
            s("a", Undo, 1)
        ]
    );
    assert!(doc.failure.as_deref().unwrap().contains("c cannot be done"));
    let effects = h.log.effects.lock().unwrap().clone();
    assert_eq!(effects.get(&format!("{}:b:undo", doc.id)), Some(&1));
    assert_eq!(effects.get(&format!("{}:a:undo", doc.id)), Some(&1));
    h.stop().await;
}

#[tokio::test]
async fn outcomes_branch_as_the_route_says() {
    let h = Harness::new().await;
    let doc = h
        .check(
            &Script {
                a_outcome: Some("skip".into()),
                ..script("skip")
            },
            Status::Completed,
        )
        .await;
    assert_eq!(steps(&doc), [s("a", Fwd, 1), s("c", Fwd, 1)]);

    let doc = h
        .check(
            &Script {
                a_outcome: Some("refused".into()),
                ..script("refused")
            },
            Status::Failed,
        )
        .await;
    assert_eq!(steps(&doc), [s("a", Fwd, 1)], "a refused outcome owes no compensation");

    let doc = h
        .check(
            &Script {
                a_outcome: Some("surprise".into()),
                ..script("unmapped")
            },
            Status::Failed,
        )
        .await;
    assert!(doc.failure.as_deref().unwrap().contains("does not map"));
    h.stop().await;
}

#[tokio::test]
async fn a_hanging_step_times_out_and_is_retried_then_compensated() {
    let h = Harness::new().await;
    let doc = h
        .check(
            &Script {
                b_hangs: true,
                ..script("hang")
            },
            Status::Compensated,
        )
        .await;
    assert_eq!(
        steps(&doc),
        [
            s("a", Fwd, 1),
            s("b", Fwd, 1),
            s("b", Fwd, 2),
            s("b", Fwd, 3),
            // b's attempts ran out on timeouts, so b may have done part of
            // its work: its undo runs first.
            s("b", Undo, 1),
            s("a", Undo, 1)
        ]
    );
    assert!(
        doc.failure.as_deref().unwrap().contains("timed out after 100 ms"),
        "{:?}",
        doc.failure
    );
    h.stop().await;
}

#[tokio::test]
async fn a_panicking_handler_is_retried_and_the_worker_survives() {
    let h = Harness::new().await;
    let doc = h
        .check(
            &Script {
                b_panics: true,
                ..script("boom")
            },
            Status::Compensated,
        )
        .await;
    // Three attempts, then b's own undo (a panic leaves its work unknown).
    assert_eq!(h.log.calls_of("b"), 4);
    assert!(doc
        .failure
        .as_deref()
        .unwrap()
        .contains("handler panicked: b exploded for boom"));
    // Other orders are unaffected, before and after.
    h.check(&script("after"), Status::Completed).await;
    h.stop().await;
}

#[tokio::test]
async fn an_invalid_payload_is_refused_at_start() {
    let h = Harness::new().await;
    let e = h.registry.prepare("trip", &script("")).unwrap_err();
    assert_eq!(e.to_string(), "invalid trip payload: name: must not be empty");
    let e = h.registry.prepare_json("trip", br#"{"name": 7}"#).unwrap_err();
    assert!(e.to_string().contains("invalid type"), "{e}");
    let e = h.registry.prepare_json("nope", b"{}").unwrap_err();
    assert_eq!(e.to_string(), "unknown workflow `nope`");
    assert_eq!(h.transport.stored(), 0, "nothing was started");
    h.stop().await;
}

/// A raw message on a hop subject, as any client could publish it.
fn raw(service: &str, headers: Headers, body: Vec<u8>) -> Outgoing {
    Outgoing {
        subject: format!("waybill.hop.{service}"),
        msg_id: None,
        headers,
        payload: Bytes::from(body),
        due: None,
    }
}

fn doc_for(wf: &Workflow) -> Document {
    Document::new(
        OrderId::new(),
        wf.shared_route(),
        Payload::postcard(&script("raw")).unwrap(),
    )
}

fn good_headers(doc: &Document) -> Headers {
    headers::for_hop(doc, Format::Postcard)
}

#[tokio::test]
async fn bad_input_is_dead_lettered_with_its_reason_and_the_worker_carries_on() {
    let other = Workflow::builder("unknown", 1).step("a", "t.a").build().unwrap();
    let known = [(WorkflowName::new("trip").unwrap(), 1)];
    let h = Harness::with(|b| b.codec(Codec::with_max_size(4096)).accept(known)).await;
    let codec = Codec::default();
    let wf = three_steps();

    let good = doc_for(&wf);
    let bytes = codec.encode(&good, Format::Postcard).unwrap();
    let mut cases: Vec<(Outgoing, &str)> = Vec::new();
    cases.push((
        raw("t.a", good_headers(&good), b"\x00\xffrandom garbage".to_vec()),
        "bad magic",
    ));
    cases.push((
        raw("t.a", good_headers(&good), bytes[..bytes.len() / 2].to_vec()),
        "truncated",
    ));
    let mut v9 = bytes.clone();
    v9[2] = 9;
    cases.push((raw("t.a", good_headers(&good), v9), "envelope version 9"));
    let mut wrong_ct = good_headers(&good);
    wrong_ct.insert(headers::CONTENT_TYPE, "text/plain");
    cases.push((
        raw("t.a", wrong_ct, bytes.clone()),
        "unknown document content type `text/plain`",
    ));
    let mut no_ct = Headers::new();
    for (n, v) in good_headers(&good).iter() {
        if n != headers::CONTENT_TYPE {
            no_ct.insert(n.to_owned(), v);
        }
    }
    cases.push((raw("t.a", no_ct, bytes.clone()), "no content type"));
    cases.push((
        raw("t.a", good_headers(&good), vec![b'W'; 5000]),
        "over the limit of 4096",
    ));
    let mut lying = good_headers(&good);
    let real = lying.get(headers::HOP).unwrap().to_owned();
    lying.insert(headers::HOP, real.replacen(" 0 ", " 7 ", 1));
    cases.push((raw("t.a", lying, bytes.clone()), "header `Waybill-Hop` gives hop `7`"));
    let mut done = doc_for(&wf);
    done.status = Status::Completed;
    cases.push((
        raw(
            "t.a",
            good_headers(&done),
            codec.encode(&done, Format::Postcard).unwrap(),
        ),
        "already completed",
    ));
    cases.push((
        raw("t.b", good_headers(&good), bytes.clone()),
        "addressed to `t.a` arrived on `t.b`",
    ));
    let stranger = doc_for(&other);
    cases.push((
        raw(
            "t.a",
            good_headers(&stranger),
            codec.encode(&stranger, Format::Postcard).unwrap(),
        ),
        "unknown workflow `unknown` version 1",
    ));
    let json = codec.encode(&good, Format::Json).unwrap();
    cases.push((raw("t.a", good_headers(&good), json), "bad magic"));

    let n = cases.len();
    let expected: Vec<&str> = cases.iter().map(|c| c.1).collect();
    for (msg, _) in cases {
        h.transport.publish(msg).await.unwrap();
    }
    tokio::time::timeout(DEADLINE, h.transport.wait_for_dead_letters(n))
        .await
        .expect("every bad message should be dead-lettered");
    let dead: Vec<DeadLetter> = h.transport.dead_letters();
    assert_eq!(dead.len(), n);
    for want in expected {
        assert!(
            dead.iter().any(|d| d.reason.contains(want)),
            "no dead letter says {want:?}; got {:#?}",
            dead.iter().map(|d| &d.reason).collect::<Vec<_>>()
        );
    }
    // The dead letter keeps the message as it came.
    assert!(dead
        .iter()
        .any(|d| d.message.payload.as_ref() == b"\x00\xffrandom garbage"));
    // And the worker is still serving.
    h.check(&script("after garbage"), Status::Completed).await;
    assert_eq!(h.transport.dead_letters().len(), n);
    h.stop().await;
}

#[tokio::test]
async fn a_lost_output_is_redelivered_and_its_effect_happens_once() {
    // The next two publishes of step b's output fail, as when a worker
    // dies between running a step and storing its result. Not an
    // unavailable stream (that is waited out in place, see
    // tests/unavailable.rs): a failure the worker hands back, so the step
    // is delivered and run again.
    let inner = Embedded::new();
    let failures_left = AtomicUsize::new(2);
    let flaky = Faulty::new(inner.clone(), move |m: &Outgoing| {
        let lost = m.subject == "waybill.hop.t.c"
            && failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if lost {
            PublishFault::Refuse(TransportError::Other {
                message: "simulated lost publish".into(),
                retryable: true,
            })
        } else {
            PublishFault::Pass
        }
    });
    let log = Arc::new(Log::default());
    let worker = serve(Worker::builder(flaky.clone()), &log).start().await.unwrap();
    let client = Client::connect(inner.clone()).await.unwrap();
    let wf = three_steps();
    let id = client
        .start(&wf, Payload::postcard(&script("lost")).unwrap())
        .await
        .unwrap();
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Completed);
    // Step b ran three times (its output was lost twice), each time with the
    // same idempotency key, so an idempotent service applies it once ...
    let calls = log.calls.lock().unwrap().clone();
    let b: Vec<_> = calls.iter().filter(|c| c.0 == "b").collect();
    assert_eq!(b.len(), 3);
    assert!(b.iter().all(|c| c.1 == 1 && c.2 == format!("{id}:b")), "{b:?}");
    // ... and the order moved on once: one b in the history, one c.
    assert_eq!(steps(&doc), [s("a", Fwd, 1), s("b", Fwd, 1), s("c", Fwd, 1)]);
    assert_eq!(log.calls_of("c"), 1);
    assert!(worker.stats().naks.load(Ordering::Relaxed) >= 2);
    worker.shutdown().await;
    client.close().await;
}

#[tokio::test]
async fn a_republished_hop_is_not_done_twice() {
    let h = Harness::new().await;
    let id = OrderId::new();
    let wf = three_steps();
    let payload = Payload::postcard(&script("twice")).unwrap();
    let first = h.client.start_with_id(id, &wf, payload.clone()).await.unwrap();
    let again = h.client.start_with_id(id, &wf, payload).await.unwrap();
    assert!(!first.duplicate && again.duplicate);
    h.finish(id).await;
    assert_eq!(h.log.calls_of("a"), 1);
    h.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_work_in_flight_and_loses_nothing() {
    let transport = Embedded::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let running = Arc::new(AtomicUsize::new(0));
    let log = Arc::new(Log::default());
    let slow_a = {
        let (gate, started, running) = (gate.clone(), started.clone(), running.clone());
        move |_ctx: StepContext, _p: Payload| {
            let (gate, started, running) = (gate.clone(), started.clone(), running.clone());
            async move {
                running.fetch_add(1, Ordering::SeqCst);
                started.notify_one();
                let _permit = gate.acquire().await.map_err(|_| StepError::transient("closed"))?;
                Ok(StepOutput::ok())
            }
        }
    };
    let worker = Worker::builder(transport.clone())
        .serve("t.a", slow_a)
        .concurrency(4)
        .pumps(1)
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let wf = three_steps();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            client
                .start(&wf, Payload::postcard(&script(&format!("o{i}"))).unwrap())
                .await
                .unwrap(),
        );
    }
    // Wait until the worker holds four steps in flight.
    tokio::time::timeout(DEADLINE, async {
        while running.load(Ordering::SeqCst) < 4 {
            started.notified().await;
        }
    })
    .await
    .unwrap();
    let stopping = tokio::spawn(worker.shutdown());
    gate.add_permits(1000);
    tokio::time::timeout(DEADLINE, stopping).await.unwrap().unwrap();

    // Whatever was in flight finished and moved on; the rest waits, unacked.
    let a = transport
        .consumer_stats(&subject::service_consumer(&"t.a".parse().unwrap()))
        .unwrap();
    assert_eq!(a.in_flight, 0, "nothing is left half-done");
    let done = running.load(Ordering::SeqCst);
    assert!(done >= 4);
    assert_eq!(
        a.unacked() + done,
        20,
        "every order is either done with a or still waiting for it"
    );
    // The stream holds the 20 starts and one next hop per finished step.
    assert_eq!(
        transport.stored(),
        20 + done as u64,
        "each step that finished stored its next hop"
    );

    // A new worker picks up the rest and every order completes.
    let worker = serve(Worker::builder(transport.clone()), &log).start().await.unwrap();
    for id in ids {
        let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
        assert_eq!(doc.status, Status::Completed);
        assert_eq!(doc.history.iter().filter(|r| r.step.as_str() == "a").count(), 1);
    }
    worker.shutdown().await;
    client.close().await;
}

#[tokio::test]
async fn orders_in_flight_keep_the_route_they_started_with() {
    let transport = Embedded::new();
    let client = Client::connect(transport.clone()).await.unwrap();
    let mut registry = Registry::new();
    let v1 = Workflow::builder("trip", 1)
        .step("a", "t.a")
        .step("b", "t.b")
        .build()
        .unwrap();
    let v2 = Workflow::builder("trip", 2)
        .step("a", "t.a")
        .step("c", "t.c")
        .step("b", "t.b")
        .build()
        .unwrap();
    registry.register::<Script>(v1);
    // Version-1 orders start, and wait in the stream: no worker runs yet.
    let mut old = Vec::new();
    for i in 0..5 {
        let (wf, p) = registry.prepare("trip", &script(&format!("v1-{i}"))).unwrap();
        old.push(client.start(&wf, p).await.unwrap());
    }
    // The definition changes; new orders take version 2.
    registry.register::<Script>(v2);
    let mut new = Vec::new();
    for i in 0..5 {
        let (wf, p) = registry.prepare("trip", &script(&format!("v2-{i}"))).unwrap();
        new.push(client.start(&wf, p).await.unwrap());
    }
    let log = Arc::new(Log::default());
    let worker = serve(
        Worker::builder(transport.clone()).accept(registry.versions().collect::<Vec<_>>()),
        &log,
    )
    .start()
    .await
    .unwrap();
    for (ids, version, route) in [(old, 1, vec!["a", "b"]), (new, 2, vec!["a", "c", "b"])] {
        for id in ids {
            let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
            assert_eq!(doc.status, Status::Completed);
            assert_eq!(doc.route.version, version);
            let ran: Vec<&str> = doc.history.iter().map(|r| r.step.as_str()).collect();
            assert_eq!(ran, route);
        }
    }
    worker.shutdown().await;
    client.close().await;
}

#[tokio::test]
async fn a_worker_without_a_sound_configuration_does_not_start() {
    let t = Embedded::new();
    let e = Worker::builder(t.clone()).start().await.unwrap_err();
    assert!(matches!(e, WorkerError::NoServices), "{e}");
    let noop = |_c: StepContext, _p: Payload| async { Ok(StepOutput::ok()) };
    let e = Worker::builder(t.clone())
        .serve("bad subject", noop)
        .start()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("bad subject"), "{e}");
    let e = Worker::builder(t.clone())
        .serve("t.a", noop)
        .serve("t.a", noop)
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, WorkerError::DuplicateService(_)), "{e}");
    let e = Worker::builder(t)
        .serve("t.a", noop)
        .concurrency(0)
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, WorkerError::ZeroConcurrency), "{e}");
}

#[tokio::test]
async fn a_closed_client_leaves_no_consumer_behind() {
    let h = Harness::new().await;
    let other = Client::connect(h.transport.clone()).await.unwrap();
    other.close().await;
    // The finished order reaches the open client; the closed one holds none.
    h.check(&script("after close"), Status::Completed).await;
    let leftover: Vec<_> = ["wb_t_a", "wb_t_b", "wb_t_c"]
        .iter()
        .map(|c| h.transport.consumer_stats(c).unwrap().unacked())
        .collect();
    assert_eq!(leftover, [0, 0, 0]);
    assert_eq!(h.transport.consumers_matching("waybill.done.trip"), 1);
    h.stop().await;
}

#[tokio::test]
async fn many_orders_all_finish_once() {
    let h = Harness::new().await;
    let mut ids = Vec::new();
    for i in 0..500 {
        let sc = Script {
            c_fails: i % 5 == 0,
            b_flaky: u32::from(i % 7 == 0),
            ..script(&format!("bulk-{i}"))
        };
        ids.push((h.start(&sc).await, sc.c_fails));
    }
    for (id, fails) in ids {
        let doc = h.finish(id).await;
        let want = if fails { Status::Compensated } else { Status::Completed };
        assert_eq!(doc.status, want);
    }
    // Every effect once per key.
    assert!(h.log.effects.lock().unwrap().values().all(|&n| n == 1));
    h.stop().await;
}

/// A step of `t.a` that takes `work` (a slow service) and counts its calls.
fn slow_a(work: Duration, calls: &Arc<AtomicUsize>) -> impl waybill::Handler {
    let calls = calls.clone();
    move |_ctx: StepContext, _p: Payload| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            // The slow work is the behaviour under test: a step that takes
            // longer than the ack wait of those queued behind it (on the
            // test's paused clock).
            tokio::time::sleep(work).await;
            Ok(StepOutput::ok())
        }
    }
}

async fn start_many(client: &Client<Embedded>, n: usize) -> Vec<OrderId> {
    let wf = three_steps();
    let mut ids = Vec::new();
    for i in 0..n {
        let p = Payload::postcard(&script(&format!("o{i}"))).unwrap();
        ids.push(client.start(&wf, p).await.unwrap());
    }
    ids
}

#[tokio::test(start_paused = true)]
async fn deliveries_taken_ahead_of_a_free_slot_are_kept_alive() {
    // One slot, eight taken ahead, and steps of 150 ms against an ack wait
    // of 200 ms: the sixth order waits 750 ms for its slot. Left alone, the
    // waiting deliveries would be redelivered and their steps run twice.
    // On tokio's paused clock: the steps' work, the ack wait and the
    // keep-alive are timers of one clock that moves only when all wait, so
    // the race is the same on every run and costs no real time.
    let transport = Embedded::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let builder = Worker::builder(transport.clone())
        .serve("t.a", slow_a(Duration::from_millis(150), &calls))
        .serve("t.b", |_ctx: StepContext, _p: Payload| async { Ok(StepOutput::ok()) })
        .serve("t.c", |_ctx: StepContext, _p: Payload| async { Ok(StepOutput::ok()) });
    let worker = builder
        .concurrency(1)
        .pumps(1)
        .prefetch(8)
        .ack_wait(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    for id in start_many(&client, 6).await {
        let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
        assert_eq!(doc.status, Status::Completed);
    }
    worker.shutdown().await;
    let a = transport
        .consumer_stats(&subject::service_consumer(&"t.a".parse().unwrap()))
        .unwrap();
    assert_eq!(a.unacked(), 0, "no second delivery of a step is left: {a:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 6, "each step ran once");
    client.close().await;
}

#[tokio::test]
async fn a_draining_worker_hands_back_what_it_took_ahead() {
    // The ack wait is a minute: deliveries left to lapse would come back
    // only after the test's deadline.
    let transport = Embedded::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(tokio::sync::Notify::new());
    let first = Worker::builder(transport.clone())
        .serve("t.a", gated(&gate, &entered))
        .concurrency(1)
        .pumps(1)
        .prefetch(8)
        .ack_wait(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let ids = start_many(&client, 5).await;
    tokio::time::timeout(DEADLINE, entered.notified()).await.unwrap();
    // The first worker drains: its one step is held at the gate, the other
    // four wait behind it and go back to the stream.
    let stopping = tokio::spawn(first.shutdown());
    let log = Arc::new(Log::default());
    let second = serve(Worker::builder(transport.clone()), &log)
        .ack_wait(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let (held_id, handed_back) = ids.split_first().unwrap();
    for id in handed_back {
        let doc = tokio::time::timeout(DEADLINE, client.wait(*id)).await.unwrap().unwrap();
        assert_eq!(doc.status, Status::Completed);
    }
    assert_eq!(log.calls_of("a"), 4, "the second worker ran the four handed back");
    gate.add_permits(1);
    tokio::time::timeout(DEADLINE, stopping).await.unwrap().unwrap();
    let doc = tokio::time::timeout(DEADLINE, client.wait(*held_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.status, Status::Completed);
    assert_eq!(log.calls_of("a"), 4, "the held step was not run again");
    second.shutdown().await;
    client.close().await;
}

#[tokio::test]
async fn a_cancel_that_races_a_step_undoes_it_too_and_ends_the_order_cancelled() {
    let transport = Embedded::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(tokio::sync::Notify::new());
    let calls: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let worker = Worker::builder(transport.clone())
        .serve("t.a", counted(&calls[0]))
        .serve("t.b", gated(&gate, &entered))
        .serve("t.c", counted(&calls[1]))
        .serve("t.undo_a", counted(&calls[2]))
        .serve("t.undo_b", counted(&calls[3]))
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let id = start_many(&client, 1).await[0];
    tokio::time::timeout(DEADLINE, entered.notified()).await.unwrap();
    // Asked while b runs: b finishes, and the order stops at c.
    assert!(transport.request_cancel(id, "changed my mind").await.unwrap());
    assert!(!transport.request_cancel(id, "again").await.unwrap(), "asked once");
    gate.add_permits(1);
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Cancelled, "{:?}", doc.failure);
    assert_eq!(doc.failure.as_deref(), Some("cancelled: changed my mind"));
    let steps: Vec<(&str, StepKind)> = doc.history.iter().map(|r| (r.step.as_str(), r.kind)).collect();
    assert_eq!(
        steps,
        [
            ("a", StepKind::Forward),
            ("b", StepKind::Forward),
            ("c", StepKind::Forward),
            ("b", StepKind::Compensation),
            ("a", StepKind::Compensation),
        ]
    );
    assert_eq!(
        doc.history[2].result,
        AttemptResult::Cancelled {
            reason: "changed my mind".into()
        }
    );
    let n: Vec<usize> = calls.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert_eq!(n, [1, 0, 1, 1], "a ran, c never did, both undone once");
    worker.shutdown().await;
    client.close().await;
}

#[tokio::test]
async fn an_order_cancelled_before_its_first_step_ends_with_nothing_run() {
    let transport = Embedded::new();
    let client = Client::connect(transport.clone()).await.unwrap();
    let id = start_many(&client, 1).await[0];
    transport.request_cancel(id, "wrong address").await.unwrap();
    let log = Arc::new(Log::default());
    let worker = serve(Worker::builder(transport.clone()), &log).start().await.unwrap();
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Cancelled);
    assert_eq!(doc.history.len(), 1);
    assert_eq!(log.calls_of("a"), 0);
    worker.shutdown().await;
    client.close().await;
}

/// A step with a wait runs its wait after the step before it ended, once,
/// and the order goes on; the wait is counted on the hop, not by a handler.
#[tokio::test]
async fn a_step_that_waits_runs_once_its_wait_has_passed() {
    let transport = Embedded::new();
    let wait = Duration::from_millis(400);
    let wf = Workflow::builder("reminder", 1)
        .step("hold", "t.hold")
        .step("remind", "t.remind")
        .delay(wait)
        .step("confirm", "t.confirm")
        .build()
        .unwrap();
    let reminded = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(transport.clone())
        .serve("t.hold", ok)
        .serve("t.remind", counted(&reminded))
        .serve("t.confirm", ok)
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let id = client
        .start(&wf, Payload::postcard(&script("sleepy")).unwrap())
        .await
        .unwrap();
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Completed);
    assert_eq!(reminded.load(Ordering::SeqCst), 1, "the step after the wait ran once");
    let steps: Vec<&str> = doc.history.iter().map(|r| r.step.as_str()).collect();
    assert_eq!(steps, ["hold", "remind", "confirm"]);
    let (hold, remind) = (&doc.history[0], &doc.history[1]);
    assert!(
        remind.started_at >= hold.ended_at.plus(wait),
        "remind started {:?} after hold ended, before its wait of {wait:?}",
        remind.started_at.since(hold.ended_at)
    );
    assert_eq!(remind.attempt, 1, "the wait spent no attempt");
    worker.shutdown().await;
    client.close().await;
}

/// An order asleep on a long wait meets its cancel at once: its hold is
/// undone and it ends cancelled, without waiting out the hour.
#[tokio::test]
async fn a_cancel_wakes_an_order_asleep_on_a_wait() {
    let transport = Embedded::new();
    let wf = reminder(Duration::from_secs(3600));
    let worker = serve_reminder(Worker::builder(transport.clone()), must_not_remind)
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let id = client
        .start(&wf, Payload::postcard(&script("asleep")).unwrap())
        .await
        .unwrap();
    // Asleep: the remind hop was handed back until it is due.
    let remind = subject::service_consumer(&"t.remind".parse().unwrap());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while transport.consumer_stats(&remind).is_none_or(|s| s.delayed == 0) {
        assert!(tokio::time::Instant::now() < deadline, "the order never went to sleep");
        tokio::task::yield_now().await;
    }
    assert!(transport.request_cancel(id, "trip called off").await.unwrap());
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Cancelled, "{}", doc.journal());
    let steps: Vec<(&str, &str)> = doc
        .history
        .iter()
        .map(|r| (r.step.as_str(), r.service.as_str()))
        .collect();
    assert_eq!(
        steps,
        [("hold", "t.hold"), ("remind", "t.remind"), ("hold", "t.release")],
        "cancelled at remind (not run), then the hold undone"
    );
    assert_eq!(
        doc.history[1].result,
        AttemptResult::Cancelled {
            reason: "trip called off".into()
        }
    );
    worker.shutdown().await;
    client.close().await;
}

/// A wait of two days on the embedded default, on tokio's paused clock: the
/// order sleeps (its hop handed back until due), the clock jumps, and the
/// step runs once, two days after the step before it, in no real time.
#[tokio::test(start_paused = true)]
async fn a_two_day_wait_passes_on_tokios_paused_clock() {
    waybill::Timestamp::follow_tokio_clock();
    let two_days = Duration::from_secs(48 * 3600);
    let transport = Embedded::new();
    let wf = reminder(two_days);
    let reminded = Arc::new(AtomicUsize::new(0));
    let worker = serve_reminder(Worker::builder(transport.clone()), counted(&reminded))
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let id = client
        .start(&wf, Payload::postcard(&script("patient")).unwrap())
        .await
        .unwrap();
    let began = tokio::time::Instant::now();
    // A deadline on the same clock, past the wait.
    let doc = tokio::time::timeout(two_days + DEADLINE, client.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    assert_eq!(reminded.load(Ordering::SeqCst), 1, "reminded once");
    let (hold, remind) = (&doc.history[0], &doc.history[1]);
    assert!(remind.started_at >= hold.ended_at.plus(two_days), "not before its wait");
    assert!(began.elapsed() >= two_days, "the paused clock went past the wait");
    let stats = worker.stats();
    assert_eq!(
        stats.naks.load(Ordering::Relaxed),
        1,
        "handed back once, until due, not polled"
    );
    worker.shutdown().await;
    client.close().await;
}

/// A step that waits until a time its payload holds: it runs once that time
/// has passed; a payload without it fails the order, naming the field.
#[tokio::test]
async fn a_step_waits_until_the_time_its_payload_names() {
    let transport = Embedded::new();
    let wf = Workflow::builder("ship_later", 1)
        .step("pack", "t.pack")
        .compensate("t.unpack")
        .step("ship", "t.ship")
        .not_before("ship_at")
        .build()
        .unwrap();
    let shipped = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(transport.clone())
        .serve("t.pack", ok)
        .serve("t.unpack", ok)
        .serve("t.ship", counted(&shipped))
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let ship_at = waybill::Timestamp::now().plus(Duration::from_millis(400));
    let on_time = client
        .start(
            &wf,
            Payload::json(&serde_json::json!({ "ship_at": waybill::coordinator::api::rfc3339(ship_at) })).unwrap(),
        )
        .await
        .unwrap();
    let undated = client
        .start(&wf, Payload::json(&serde_json::json!({ "ship": "soon" })).unwrap())
        .await
        .unwrap();

    let doc = tokio::time::timeout(DEADLINE, client.wait(on_time))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    assert!(doc.history[1].started_at >= ship_at, "shipped before its time");
    let doc = tokio::time::timeout(DEADLINE, client.wait(undated))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.status, Status::Compensated, "{}", doc.journal());
    assert_eq!(
        doc.failure.as_deref(),
        Some("step `ship` waits until the payload's `ship_at`, which is missing")
    );
    assert_eq!(shipped.load(Ordering::SeqCst), 1, "only the dated order shipped");
    worker.shutdown().await;
    client.close().await;
}

/// A binary (postcard) payload's time is read through the worker's
/// registry, which knows the payload's type; without one, the order fails
/// saying so.
#[tokio::test]
async fn a_binary_payloads_time_is_read_through_the_registry() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Dated {
        name: String,
        /// Milliseconds since the epoch.
        ship_at: u64,
    }
    impl waybill::WorkflowPayload for Dated {
        fn validate(&self) -> Result<(), waybill::InvalidPayload> {
            Ok(())
        }
    }
    let wf = Workflow::builder("ship_later", 1)
        .step("pack", "t.pack")
        .step("ship", "t.ship")
        .not_before("ship_at")
        .build()
        .unwrap();
    let mut registry = Registry::new();
    registry.register::<Dated>(wf.clone());
    let registry = Arc::new(registry);
    let ship_at = waybill::Timestamp::now().plus(Duration::from_millis(300));
    let payload = Payload::postcard(&Dated {
        name: "boxed".into(),
        ship_at: ship_at.0 / 1000 + 1,
    })
    .unwrap();
    for with_registry in [true, false] {
        let transport = Embedded::new();
        let mut builder = Worker::builder(transport.clone())
            .serve("t.pack", ok)
            .serve("t.ship", ok);
        if with_registry {
            builder = builder.registry(registry.clone());
        }
        let worker = builder.start().await.unwrap();
        let client = Client::connect(transport.clone()).await.unwrap();
        let id = client.start(&wf, payload.clone()).await.unwrap();
        let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
        if with_registry {
            assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
            assert!(doc.history[1].started_at >= ship_at, "shipped before its time");
        } else {
            assert_eq!(doc.status, Status::Failed, "{}", doc.journal());
            let failure = doc.failure.clone().unwrap_or_default();
            assert!(failure.contains("this worker has no registry"), "{failure}");
        }
        worker.shutdown().await;
        client.close().await;
    }
}

/// Waits until a hop of `service` sleeps (handed back until it is due).
async fn asleep_at(transport: &Embedded, service: &str) {
    let consumer = subject::service_consumer(&service.parse().unwrap());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while transport.consumer_stats(&consumer).is_none_or(|s| s.delayed == 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no hop of {service} went to sleep"
        );
        tokio::task::yield_now().await;
    }
}

/// `t.book`: says what it saw of the signal `approved`, and answers `ok`.
fn booking(seen: &Arc<std::sync::Mutex<Vec<Option<String>>>>) -> impl waybill::Handler {
    let seen = seen.clone();
    move |ctx: StepContext, _p: Payload| {
        seen.lock().unwrap().push(ctx.signal("approved").map(str::to_owned));
        async { Ok(StepOutput::ok()) }
    }
}

/// A signal delivered while the order waits for it wakes it: the step runs
/// once, with the signal's JSON, which the document keeps under its name;
/// the same signal again is a duplicate and changes nothing.
#[tokio::test]
async fn a_signal_wakes_the_order_waiting_for_it_and_is_kept_once() {
    let transport = Embedded::new();
    let wf = approval(Duration::from_secs(3600), waybill::Then::Fail);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let worker = Worker::builder(transport.clone())
        .serve("t.hold", ok)
        .serve("t.release", ok)
        .serve("t.book", booking(&seen))
        .serve("t.nudge", ok)
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let id = client
        .start(&wf, Payload::postcard(&script("x")).unwrap())
        .await
        .unwrap();
    asleep_at(&transport, "t.book").await;
    let approved: waybill::SignalName = "approved".parse().unwrap();
    assert!(transport.send_signal(id, &approved, r#"{"by":"ana"}"#).await.unwrap());
    assert!(
        !transport.send_signal(id, &approved, r#"{"by":"bob"}"#).await.unwrap(),
        "a duplicate"
    );
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    assert_eq!(
        *seen.lock().unwrap(),
        [Some(r#"{"by":"ana"}"#.to_owned())],
        "booked once, with the first"
    );
    assert_eq!(doc.signal("approved"), Some(r#"{"by":"ana"}"#));
    let results: Vec<&AttemptResult> = doc.history.iter().map(|r| &r.result).collect();
    assert!(
        matches!(
            results[..],
            [
                AttemptResult::Outcome(_),
                AttemptResult::Signal { data: Some(_), .. },
                AttemptResult::Outcome(_)
            ]
        ),
        "{}",
        doc.journal()
    );
    assert_eq!(
        doc.visits(&"book".parse().unwrap()),
        1,
        "the signal is not a visit of its own"
    );
    worker.shutdown().await;
    client.close().await;
}

/// A signal delivered before the order reaches the step that waits for it
/// is kept, and the order does not wait at all when it gets there.
#[tokio::test]
async fn a_signal_before_the_step_is_kept_until_the_order_gets_there() {
    let transport = Embedded::new();
    let wf = approval(Duration::from_secs(3600), waybill::Then::Fail);
    let (gate, entered) = (
        Arc::new(tokio::sync::Semaphore::new(0)),
        Arc::new(tokio::sync::Notify::new()),
    );
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let worker = Worker::builder(transport.clone())
        .serve("t.hold", gated(&gate, &entered))
        .serve("t.release", ok)
        .serve("t.book", booking(&seen))
        .serve("t.nudge", ok)
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let id = client
        .start(&wf, Payload::postcard(&script("x")).unwrap())
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, entered.notified()).await.unwrap();
    let approved: waybill::SignalName = "approved".parse().unwrap();
    assert!(transport.send_signal(id, &approved, "true").await.unwrap());
    gate.add_permits(1);
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    assert_eq!(*seen.lock().unwrap(), [Some("true".to_owned())]);
    assert_eq!(worker.stats().naks.load(Ordering::Relaxed), 0, "it never slept");
    worker.shutdown().await;
    client.close().await;
}

/// Past its deadline without the signal, the route goes `on_timeout`: to
/// fail (undoing the hold) by default, or to another step; the step that
/// waited never runs. Two days pass on tokio's paused clock.
#[tokio::test(start_paused = true)]
async fn a_signal_deadline_passing_goes_where_the_route_says() {
    waybill::Timestamp::follow_tokio_clock();
    let two_days = Duration::from_secs(48 * 3600);
    for (then, end, last) in [
        (
            waybill::Then::Fail,
            Status::Compensated,
            ("hold", StepKind::Compensation),
        ),
        (
            waybill::Then::step("nudge"),
            Status::Completed,
            ("nudge", StepKind::Forward),
        ),
    ] {
        let transport = Embedded::new();
        let wf = approval(two_days, then);
        let worker = Worker::builder(transport.clone())
            .serve("t.hold", ok)
            .serve("t.release", ok)
            .serve("t.book", |_c: StepContext, _p: Payload| async {
                Err(StepError::permanent("booked without approval"))
            })
            .serve("t.nudge", ok)
            .start()
            .await
            .unwrap();
        let client = Client::connect(transport.clone()).await.unwrap();
        let id = client
            .start(&wf, Payload::postcard(&script("x")).unwrap())
            .await
            .unwrap();
        let doc = tokio::time::timeout(two_days + DEADLINE, client.wait(id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(doc.status, end, "{}", doc.journal());
        let timed_out = &doc.history[1];
        assert_eq!(
            timed_out.result,
            AttemptResult::Signal {
                name: "approved".parse().unwrap(),
                data: None
            }
        );
        assert!(
            timed_out.ended_at >= doc.history[0].ended_at.plus(two_days),
            "not before its deadline"
        );
        let r = doc.history.last().unwrap();
        assert_eq!((r.step.as_str(), r.kind), last, "{}", doc.journal());
        if end == Status::Compensated {
            assert!(doc
                .failure
                .as_deref()
                .unwrap()
                .contains("waited for signal `approved` past its deadline"));
        }
        worker.shutdown().await;
        client.close().await;
    }
}

/// A cancel reaches an order waiting for a signal: it wakes, is cancelled
/// at the waiting step (not run), and its hold is undone.
#[tokio::test]
async fn a_cancel_reaches_an_order_waiting_for_a_signal() {
    let transport = Embedded::new();
    let wf = approval(Duration::from_secs(3600), waybill::Then::Fail);
    let worker = Worker::builder(transport.clone())
        .serve("t.hold", ok)
        .serve("t.release", ok)
        .serve("t.book", must_not_remind)
        .serve("t.nudge", ok)
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let id = client
        .start(&wf, Payload::postcard(&script("x")).unwrap())
        .await
        .unwrap();
    asleep_at(&transport, "t.book").await;
    assert!(transport.request_cancel(id, "no longer needed").await.unwrap());
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Cancelled, "{}", doc.journal());
    let steps: Vec<(&str, StepKind)> = doc.history.iter().map(|r| (r.step.as_str(), r.kind)).collect();
    assert_eq!(
        steps,
        [
            ("hold", StepKind::Forward),
            ("book", StepKind::Forward),
            ("hold", StepKind::Compensation)
        ]
    );
    worker.shutdown().await;
    client.close().await;
}

/// A signal kept for a later step does not wake the order asleep at an
/// earlier one: only the signal a hop waits for wakes it. When the order
/// gets to the later step, the kept signal lets it through at once.
#[tokio::test]
async fn a_signal_for_a_later_step_leaves_the_order_asleep_where_it_is() {
    let transport = Embedded::new();
    let wf = two_approvals();
    let worker = serve_two_approvals(Worker::builder(transport.clone()))
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let id = client
        .start(&wf, Payload::postcard(&script("x")).unwrap())
        .await
        .unwrap();
    asleep_at(&transport, "t.first").await;
    let name = |n: &str| n.parse::<waybill::SignalName>().unwrap();
    assert!(transport.send_signal(id, &name("second_ok"), "{}").await.unwrap());
    let first = subject::service_consumer(&"t.first".parse().unwrap());
    let stats = transport.consumer_stats(&first).unwrap();
    assert_eq!(stats.delayed, 1, "still asleep at the first step: {stats:?}");
    assert_eq!(
        worker.stats().naks.load(Ordering::Relaxed),
        1,
        "handed back once, not woken"
    );
    assert!(transport.send_signal(id, &name("first_ok"), "{}").await.unwrap());
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    assert_eq!(
        worker.stats().naks.load(Ordering::Relaxed),
        1,
        "the second step did not wait: its signal was kept"
    );
    worker.shutdown().await;
    client.close().await;
}

/// A signal that cannot be read for now (its store electing a leader) is
/// not an attempt and not a timeout: the look-up is tried again after the
/// unavailable backoff (each retry handed back until due, not asked at
/// once), folded into one wait record, and the step runs once it is read.
#[tokio::test]
async fn an_unreadable_signal_is_waited_out_with_backoff() {
    let faulty = Faulty::new(Embedded::new(), |_| PublishFault::Pass);
    let wf = approval(Duration::from_secs(3600), waybill::Then::Fail);
    let booked = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(faulty.clone())
        .serve("t.hold", ok)
        .serve("t.release", ok)
        .serve("t.book", counted(&booked))
        .start()
        .await
        .unwrap();
    let client = Client::connect(faulty.clone()).await.unwrap();
    // Kept before the order starts, so that no wait for it is involved.
    let id = OrderId::new();
    let approved: waybill::SignalName = "approved".parse().unwrap();
    assert!(faulty.send_signal(id, &approved, "{}").await.unwrap());
    faulty.unreadable_signals.store(usize::MAX, Ordering::SeqCst);
    client
        .start_with_id(id, &wf, Payload::postcard(&script("x")).unwrap())
        .await
        .unwrap();
    // Two retries handed back until due, then the store is back.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while worker.stats().naks.load(Ordering::Relaxed) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no retry was handed back");
        tokio::task::yield_now().await;
    }
    faulty.unreadable_signals.store(0, Ordering::SeqCst);
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    assert_eq!(booked.load(Ordering::SeqCst), 1);
    let waits: Vec<u32> = doc
        .history
        .iter()
        .filter_map(|r| match r.result {
            AttemptResult::Unavailable { tries, .. } => Some(tries),
            _ => None,
        })
        .collect();
    assert!(matches!(waits[..], [n] if n >= 2), "one wait record: {}", doc.journal());
    assert_eq!(
        u64::from(waits[0]),
        worker.stats().naks.load(Ordering::Relaxed),
        "each retry handed back once, until its backoff ended"
    );
    worker.shutdown().await;
    client.close().await;
}

/// A deadline passing into a step that waits until a payload time: that
/// wait holds too (the step runs at its time, not at once). On tokio's
/// paused clock.
#[tokio::test(start_paused = true)]
async fn a_signal_timeout_into_a_timed_step_waits_for_its_time() {
    waybill::Timestamp::follow_tokio_clock();
    let day = Duration::from_secs(24 * 3600);
    let transport = Embedded::new();
    let wf = Workflow::builder("nudging", 1)
        .step("hold", "t.hold")
        .step("book", "t.book")
        .await_signal("approved", 2 * day)
        .on_timeout(waybill::Then::step("nudge"))
        .on("ok", waybill::Then::Complete)
        .step("nudge", "t.nudge")
        .not_before("nudge_at")
        .build()
        .unwrap();
    let worker = Worker::builder(transport.clone())
        .serve("t.hold", ok)
        .serve("t.book", must_not_remind)
        .serve("t.nudge", ok)
        .start()
        .await
        .unwrap();
    let client = Client::connect(transport.clone()).await.unwrap();
    let nudge_at = waybill::Timestamp::now().plus(3 * day);
    let payload = Payload::json(&serde_json::json!({"nudge_at": nudge_at.0 / 1000})).unwrap();
    let id = client.start(&wf, payload).await.unwrap();
    let doc = tokio::time::timeout(4 * day, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    let nudge = doc.history.last().unwrap();
    assert_eq!(nudge.step.as_str(), "nudge", "{}", doc.journal());
    assert!(
        nudge.started_at >= nudge_at,
        "nudged before its time:\n{}",
        doc.journal()
    );
    worker.shutdown().await;
    client.close().await;
}

/// Whether a signal came in time is when it was kept, not when its step's
/// hop is read: with the step's worker late (started only after the
/// deadline), a signal kept before the deadline is used, and one kept
/// after it is not (the route goes on_timeout). On tokio's paused clock.
#[tokio::test(start_paused = true)]
async fn a_signal_is_in_time_by_when_it_was_kept_not_when_it_is_read() {
    waybill::Timestamp::follow_tokio_clock();
    let day = Duration::from_secs(24 * 3600);
    let wf = approval(2 * day, waybill::Then::Fail);
    let approved: waybill::SignalName = "approved".parse().unwrap();
    for (kept_in_time, end) in [(true, Status::Completed), (false, Status::Compensated)] {
        let transport = Embedded::new();
        let holder = Worker::builder(transport.clone())
            .serve("t.hold", ok)
            .serve("t.release", ok)
            .start()
            .await
            .unwrap();
        let client = Client::connect(transport.clone()).await.unwrap();
        let id = client
            .start(&wf, Payload::postcard(&script("x")).unwrap())
            .await
            .unwrap();
        // The hold done (its next hop stored, for a worker not there yet),
        // the clock is moved by hand: a day, or three (past the deadline),
        // before the signal is kept; then past the deadline in any case.
        let give_up = std::time::Instant::now() + DEADLINE;
        while holder.stats().published.load(Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < give_up, "the hold never ran");
            tokio::task::yield_now().await;
        }
        let before = if kept_in_time { day } else { 3 * day };
        tokio::time::advance(before).await;
        assert!(transport.send_signal(id, &approved, "{}").await.unwrap());
        tokio::time::advance((3 * day).saturating_sub(before)).await;
        // The step's worker comes only now, past the deadline.
        let booker = Worker::builder(transport.clone())
            .serve("t.book", ok)
            .start()
            .await
            .unwrap();
        let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
        assert_eq!(doc.status, end, "{}", doc.journal());
        holder.shutdown().await;
        booker.shutdown().await;
        client.close().await;
    }
}
