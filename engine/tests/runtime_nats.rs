//! The worker runtime and the client on NATS JetStream, against a throwaway
//! nats-server: the same workflow as the embedded runtime tests, now with
//! two worker processes' worth of workers sharing the consumers, and dead
//! letters stored in the WAYBILL_DLQ stream with their reason.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use waybill::transport::nats::{Nats, NatsConfig, DLQ_STREAM};
use waybill::transport::{Headers, Outgoing, Transport};
use waybill::{headers, Client, Payload, Status, Worker, WorkerId};
use waybill_testkit::NatsServer;

use common::{
    approval, counted, gated, must_not_remind, ok, reminder, script, serve, serve_reminder, serve_two_approvals,
    three_steps, two_approvals, Log, Script,
};

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_run_to_their_end_across_two_workers() {
    let server = NatsServer::start();
    let t = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    let log = Arc::new(Log::default());
    // Two workers, as two processes would be: they share every consumer.
    let w1 = serve(Worker::builder(t.clone()).id(WorkerId::new("w1")), &log)
        .start()
        .await
        .unwrap();
    let w2 = serve(Worker::builder(t.clone()).id(WorkerId::new("w2")), &log)
        .start()
        .await
        .unwrap();
    let client = Client::connect(t.clone()).await.unwrap();
    let wf = three_steps();
    let mut ids = Vec::new();
    for i in 0..300 {
        let s = Script {
            c_fails: i % 5 == 0,
            b_flaky: u32::from(i % 7 == 0),
            ..script(&format!("n{i}"))
        };
        let want = if s.c_fails {
            Status::Compensated
        } else {
            Status::Completed
        };
        ids.push((client.start(&wf, Payload::postcard(&s).unwrap()).await.unwrap(), want));
    }
    let mut workers = std::collections::HashSet::new();
    for (id, want) in ids {
        let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
        assert_eq!(doc.status, want, "{}", doc.journal());
        workers.extend(doc.history.iter().map(|r| r.worker.as_str().to_owned()));
    }
    assert_eq!(workers.len(), 2, "both workers took a share: {workers:?}");
    // Every step ran once per order and key (no redelivery on a healthy run),
    // retries aside.
    assert!(log.effects.lock().unwrap().values().all(|&n| n == 1));
    w1.shutdown().await;
    w2.shutdown().await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_stored_as_a_dead_letter_with_its_reason() {
    let server = NatsServer::start();
    let t = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    let log = Arc::new(Log::default());
    let worker = serve(Worker::builder(t.clone()), &log).start().await.unwrap();
    let mut h = Headers::new();
    h.insert(headers::CONTENT_TYPE, waybill::codec::CONTENT_TYPE_POSTCARD);
    t.publish(Outgoing {
        subject: "waybill.hop.t.a".into(),
        msg_id: None,
        headers: h,
        payload: Bytes::from_static(b"\x00\x01 not a document"),
        due: None,
    })
    .await
    .unwrap();

    // Read it back from the dead-letter stream, as an operator would, on a
    // connection of its own.
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let stream = js.get_stream(DLQ_STREAM).await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let m = tokio::time::timeout(DEADLINE, messages.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.subject.as_str(), "waybill.dlq.t.a");
    assert_eq!(m.payload.as_ref(), b"\x00\x01 not a document");
    let reason = m
        .headers
        .as_ref()
        .unwrap()
        .get(headers::DLQ_REASON)
        .unwrap()
        .to_string();
    assert!(reason.contains("undecodable"), "{reason}");

    // The worker carries on.
    let client = Client::connect(t.clone()).await.unwrap();
    let id = client
        .start(&three_steps(), Payload::postcard(&script("after")).unwrap())
        .await
        .unwrap();
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Completed);
    worker.shutdown().await;
    client.close().await;
}

#[tokio::test]
async fn a_server_that_is_not_running_is_a_clear_error() {
    let url = {
        let server = NatsServer::start();
        server.url()
    }; // dropped: nothing listens there now
    let e = Nats::connect(&url, NatsConfig::default()).await.unwrap_err();
    assert!(e.to_string().contains("cannot connect to NATS"), "{e}");
}

/// A step's wait over NATS: the server keeps the hop (a message schedule)
/// and publishes it when due; no worker holds it meanwhile, and a worker
/// that restarts while the order sleeps loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_waits_is_kept_by_the_server_through_a_worker_restart() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use waybill::Workflow;

    let server = NatsServer::start();
    let t = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    let wait = Duration::from_secs(3);
    let wf = Workflow::builder("reminder", 1)
        .step("hold", "t.hold")
        .step("remind", "t.remind")
        .delay(wait)
        .step("confirm", "t.confirm")
        .build()
        .unwrap();
    let reminded = Arc::new(AtomicUsize::new(0));
    let start = |reminded: Arc<AtomicUsize>| {
        Worker::builder(t.clone())
            .serve("t.hold", ok)
            .serve("t.remind", counted(&reminded))
            .serve("t.confirm", ok)
            .start()
    };
    // Every timer as it is published, on a connection of the test's own.
    let raw = async_nats::connect(server.url()).await.unwrap();
    let mut timers = raw.subscribe(waybill::subject::all_timers()).await.unwrap();
    raw.flush().await.unwrap();
    let first = start(reminded.clone()).await.unwrap();
    let client = Client::connect(t.clone()).await.unwrap();
    let ids: Vec<_> = futures::future::join_all(
        (0..20).map(|i| client.start(&wf, Payload::postcard(&script(&format!("s{i}"))).unwrap())),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    // Every order asleep: its hold is done and its timer stored.
    let mut asleep = std::collections::HashSet::new();
    while asleep.len() < ids.len() {
        let m = tokio::time::timeout(DEADLINE, timers.next())
            .await
            .expect("every order's timer within the deadline")
            .unwrap();
        asleep.insert(m.subject.to_string());
    }
    assert!(ids.iter().all(|id| asleep.contains(&waybill::subject::timer(id))));
    let naks_before = first.stats().naks.load(Ordering::Relaxed);
    first.shutdown().await;
    let second = start(reminded.clone()).await.unwrap();
    for id in &ids {
        let doc = tokio::time::timeout(DEADLINE, client.wait(*id)).await.unwrap().unwrap();
        assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
        let (hold, remind) = (&doc.history[0], &doc.history[1]);
        assert_eq!(remind.step.as_str(), "remind");
        assert!(
            remind.started_at >= hold.ended_at.plus(wait),
            "remind started {:?} after hold, before its wait",
            remind.started_at.since(hold.ended_at)
        );
    }
    assert_eq!(reminded.load(Ordering::SeqCst), ids.len(), "each order reminded once");
    assert_eq!(naks_before, 0, "no hop was handed back as not due");
    assert_eq!(
        second.stats().naks.load(Ordering::Relaxed),
        0,
        "no hop came early and was handed back"
    );
    second.shutdown().await;
    client.close().await;
}

/// An order asleep on a server timer meets its cancel at once: the cancel
/// replaces the timer with one due now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_wakes_an_order_asleep_on_a_server_timer() {
    use waybill::AttemptResult;

    let server = NatsServer::start();
    let t = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    let wf = reminder(Duration::from_secs(3600));
    let raw = async_nats::connect(server.url()).await.unwrap();
    let mut timers = raw.subscribe(waybill::subject::all_timers()).await.unwrap();
    raw.flush().await.unwrap();
    let worker = serve_reminder(Worker::builder(t.clone()), must_not_remind)
        .start()
        .await
        .unwrap();
    let client = Client::connect(t.clone()).await.unwrap();
    let id = client
        .start(&wf, Payload::postcard(&script("asleep")).unwrap())
        .await
        .unwrap();
    let m = tokio::time::timeout(DEADLINE, timers.next()).await.unwrap().unwrap();
    assert_eq!(m.subject.as_str(), waybill::subject::timer(&id), "asleep on its timer");
    // Asked from another connection, as `waybill cancel` does: this worker
    // may see the woken hop before the cancel itself.
    let asking = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    assert!(asking.request_cancel(id, "trip called off").await.unwrap());
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Cancelled, "{}", doc.journal());
    let services: Vec<&str> = doc.history.iter().map(|r| r.service.as_str()).collect();
    assert_eq!(services, ["t.hold", "t.remind", "t.release"]);
    assert_eq!(
        doc.history[1].result,
        AttemptResult::Cancelled {
            reason: "trip called off".into()
        }
    );
    // The hour-long timer was replaced by the one due now, which fired:
    // none is left to fire again.
    let hops = async_nats::jetstream::new(raw.clone())
        .get_stream("WAYBILL_HOPS")
        .await
        .unwrap();
    let left = hops
        .get_last_raw_message_by_subject(&waybill::subject::timer(&id))
        .await;
    assert!(
        left.as_ref()
            .is_err_and(|e| e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound),
        "a timer is left: {left:?}"
    );
    // A cancel asked again finds no timer left to wake, and says so.
    assert!(!asking.request_cancel(id, "again").await.unwrap());
    worker.shutdown().await;
    client.close().await;
}

/// Timers pending while nats-server is killed and started again on its
/// store: every sleeping order wakes, once, and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_pending_through_a_server_kill_fire_once() {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use waybill::{StepContext, StepOutput};

    let mut server = NatsServer::start();
    let t = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    let wait = Duration::from_secs(3);
    let wf = reminder(wait);
    let reminded: Arc<Mutex<HashMap<waybill::OrderId, u32>>> = Arc::default();
    let seen = reminded.clone();
    let raw = async_nats::connect(server.url()).await.unwrap();
    let mut timers = raw.subscribe(waybill::subject::all_timers()).await.unwrap();
    raw.flush().await.unwrap();
    let remind = move |ctx: StepContext, _p: Payload| {
        *seen.lock().unwrap().entry(ctx.order_id).or_default() += 1;
        async { Ok(StepOutput::ok()) }
    };
    let worker = serve_reminder(Worker::builder(t.clone()), remind)
        .start()
        .await
        .unwrap();
    let client = Client::connect(t.clone()).await.unwrap();
    let ids: Vec<_> = futures::future::join_all(
        (0..30).map(|i| client.start(&wf, Payload::postcard(&script(&format!("k{i}"))).unwrap())),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    let mut asleep = 0;
    while asleep < ids.len() {
        tokio::time::timeout(DEADLINE, timers.next())
            .await
            .expect("every order's timer within the deadline")
            .unwrap();
        asleep += 1;
    }
    // Every timer stored and none due yet: the server goes down.
    server.restart();
    for id in &ids {
        let doc = tokio::time::timeout(DEADLINE, client.wait(*id)).await.unwrap().unwrap();
        assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    }
    let reminded = reminded.lock().unwrap().clone();
    assert_eq!(reminded.len(), ids.len(), "every order woke");
    assert!(
        reminded.values().all(|n| *n == 1),
        "each woke once: {:?}",
        reminded.values().filter(|n| **n != 1).collect::<Vec<_>>()
    );
    worker.shutdown().await;
    client.close().await;
}

/// `t.book` that counts, per order, the approvals it booked on.
fn booking(
    seen: &Arc<std::sync::Mutex<std::collections::HashMap<waybill::OrderId, Vec<String>>>>,
) -> impl waybill::Handler {
    let seen = seen.clone();
    move |ctx: waybill::StepContext, _p: Payload| {
        let approval = ctx.signal("approved").map(str::to_owned);
        seen.lock()
            .unwrap()
            .entry(ctx.order_id)
            .or_default()
            .extend(approval.clone());
        async move {
            match approval {
                Some(_) => Ok(waybill::StepOutput::ok()),
                None => Err(waybill::StepError::permanent("booked without approval")),
            }
        }
    }
}

/// Over NATS: a signal wakes an order asleep on its server timer (sent from
/// another connection, as the coordinator does), a duplicate changes
/// nothing, a signal sent before the order reaches its step is kept for
/// it, and a deadline passing fires on the server and takes the route's
/// way on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_wake_orders_asleep_on_server_timers_and_deadlines_fire_there() {
    let server = NatsServer::start();
    let t = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    let raw = async_nats::connect(server.url()).await.unwrap();
    let mut timers = raw.subscribe(waybill::subject::all_timers()).await.unwrap();
    raw.flush().await.unwrap();
    let booked = Arc::default();
    let (gate, entered) = (
        Arc::new(tokio::sync::Semaphore::new(0)),
        Arc::new(tokio::sync::Notify::new()),
    );
    let nudged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let worker = Worker::builder(t.clone())
        .serve("t.hold", ok)
        .serve("t.release", ok)
        .serve("t.book", booking(&booked))
        .serve("t.nudge", counted(&nudged))
        .start()
        .await
        .unwrap();
    let gated_worker = Worker::builder(t.clone())
        .serve("t.hold_slowly", gated(&gate, &entered))
        .start()
        .await
        .unwrap();
    let client = Client::connect(t.clone()).await.unwrap();
    let asking = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    let approved: waybill::SignalName = "approved".parse().unwrap();

    // After: asleep on its timer, woken by the signal.
    let wf = approval(Duration::from_secs(3600), waybill::Then::Fail);
    let after = client
        .start(&wf, Payload::postcard(&script("after")).unwrap())
        .await
        .unwrap();
    let m = tokio::time::timeout(DEADLINE, timers.next()).await.unwrap().unwrap();
    assert_eq!(m.subject.as_str(), waybill::subject::timer(&after));
    assert!(asking.send_signal(after, &approved, r#"{"by":"ana"}"#).await.unwrap());
    assert!(
        !asking.send_signal(after, &approved, r#"{"by":"bob"}"#).await.unwrap(),
        "a duplicate"
    );
    let doc = tokio::time::timeout(DEADLINE, client.wait(after))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    assert_eq!(doc.signal("approved"), Some(r#"{"by":"ana"}"#));

    // Before: the signal is kept while the hold runs, and used at once.
    let slow = waybill::Workflow::builder("approval_slow", 1)
        .step("hold", "t.hold_slowly")
        .step("book", "t.book")
        .await_signal("approved", Duration::from_secs(3600))
        .build()
        .unwrap();
    let before = client
        .start(&slow, Payload::postcard(&script("before")).unwrap())
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, entered.notified()).await.unwrap();
    assert!(asking.send_signal(before, &approved, r#"{"by":"cai"}"#).await.unwrap());
    gate.add_permits(1);
    let doc = tokio::time::timeout(DEADLINE, client.wait(before))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());

    // A deadline: the server's timer fires, and the route goes to nudge.
    let wf = approval(Duration::from_millis(1500), waybill::Then::step("nudge"));
    let late = client
        .start(&wf, Payload::postcard(&script("late")).unwrap())
        .await
        .unwrap();
    let doc = tokio::time::timeout(DEADLINE, client.wait(late))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    let steps: Vec<&str> = doc.history.iter().map(|r| r.step.as_str()).collect();
    assert_eq!(steps, ["hold", "book", "nudge"], "{}", doc.journal());
    assert_eq!(
        doc.history[1].result,
        waybill::AttemptResult::Signal {
            name: approved.clone(),
            data: None
        }
    );
    assert_eq!(nudged.load(std::sync::atomic::Ordering::SeqCst), 1);

    let booked = booked.lock().unwrap().clone();
    assert_eq!(
        booked.get(&after).map(Vec::as_slice),
        Some(&[r#"{"by":"ana"}"#.to_owned()][..])
    );
    assert_eq!(
        booked.get(&before).map(Vec::as_slice),
        Some(&[r#"{"by":"cai"}"#.to_owned()][..])
    );
    assert!(!booked.contains_key(&late), "booked without its signal");
    worker.shutdown().await;
    gated_worker.shutdown().await;
    client.close().await;
}

/// Orders waiting for their signals while their worker stops and the
/// server is killed and started again on its store: each gets its signal,
/// once, books once and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_waiting_for_signals_through_a_worker_restart_and_a_server_kill_get_them_once() {
    let mut server = NatsServer::start();
    let t = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    let raw = async_nats::connect(server.url()).await.unwrap();
    let mut timers = raw.subscribe(waybill::subject::all_timers()).await.unwrap();
    raw.flush().await.unwrap();
    let booked = Arc::default();
    let serve = |t: Nats| {
        Worker::builder(t)
            .serve("t.hold", ok)
            .serve("t.release", ok)
            .serve("t.book", booking(&booked))
            .start()
    };
    let worker = serve(t.clone()).await.unwrap();
    let client = Client::connect(t.clone()).await.unwrap();
    let wf = approval(Duration::from_secs(3600), waybill::Then::Fail);
    let ids: Vec<_> = futures::future::join_all(
        (0..20).map(|i| client.start(&wf, Payload::postcard(&script(&format!("w{i}"))).unwrap())),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    for _ in &ids {
        tokio::time::timeout(DEADLINE, timers.next())
            .await
            .expect("every order asleep on its timer")
            .unwrap();
    }
    // No worker, then no server: the orders wait in the store alone.
    worker.shutdown().await;
    server.restart();
    // The worker starts once JetStream answers this connection again (it
    // opens its consumers): the server has recovered its streams, the
    // bucket of signals among them.
    let worker = serve(t.clone()).await.unwrap();
    let approved: waybill::SignalName = "approved".parse().unwrap();
    for id in &ids {
        assert!(t.send_signal(*id, &approved, r#"{"by":"ops"}"#).await.unwrap());
    }
    for id in &ids {
        let doc = tokio::time::timeout(DEADLINE, client.wait(*id)).await.unwrap().unwrap();
        assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    }
    let booked = booked.lock().unwrap().clone();
    assert_eq!(booked.len(), ids.len(), "every order booked");
    assert!(
        booked.values().all(|b| b.len() == 1),
        "each booked once: {:?}",
        booked.values().filter(|b| b.len() != 1).collect::<Vec<_>>()
    );
    worker.shutdown().await;
    client.close().await;
}

/// Over NATS, a signal kept for a later step does not wake the order's
/// timer at an earlier one (no new timer is published); the awaited one
/// does, and the kept one lets the later step through at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_for_a_later_step_leaves_the_server_timer_alone() {
    let server = NatsServer::start();
    let t = Nats::connect(&server.url(), NatsConfig::default()).await.unwrap();
    let raw = async_nats::connect(server.url()).await.unwrap();
    let mut timers = raw.subscribe(waybill::subject::all_timers()).await.unwrap();
    raw.flush().await.unwrap();
    let wf = two_approvals();
    let worker = serve_two_approvals(Worker::builder(t.clone())).start().await.unwrap();
    let client = Client::connect(t.clone()).await.unwrap();
    let id = client
        .start(&wf, Payload::postcard(&script("x")).unwrap())
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, timers.next()).await.unwrap().unwrap();
    let hops = async_nats::jetstream::new(raw.clone())
        .get_stream("WAYBILL_HOPS")
        .await
        .unwrap();
    let timer = waybill::subject::timer(&id);
    let before = hops.get_last_raw_message_by_subject(&timer).await.unwrap();
    assert_eq!(
        before.headers.get(headers::AWAITS).map(|v| v.as_str()),
        Some("first_ok")
    );
    let name = |n: &str| n.parse::<waybill::SignalName>().unwrap();
    assert!(t.send_signal(id, &name("second_ok"), "{}").await.unwrap());
    let after = hops.get_last_raw_message_by_subject(&timer).await.unwrap();
    assert_eq!(after.sequence, before.sequence, "the timer was left alone");
    assert!(t.send_signal(id, &name("first_ok"), "{}").await.unwrap());
    let doc = tokio::time::timeout(DEADLINE, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    let steps: Vec<&str> = doc.history.iter().map(|r| r.step.as_str()).collect();
    assert_eq!(
        steps,
        ["hold", "first", "first", "second", "second"],
        "{}",
        doc.journal()
    );
    worker.shutdown().await;
    client.close().await;
}
