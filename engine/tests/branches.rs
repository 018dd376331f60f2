//! Parallel branches and their join, on the embedded transport: branches
//! run at the same time, the join merges what they did, a failing branch
//! stops the others and every completed step is undone newest first, a
//! join of the first n lets the late branch undo itself, a cancel reaches
//! running branches, and a join's hop lost after it was stored is made
//! again the same. Every wait has a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use waybill::transport::{Embedded, Error as TransportError, Transport};
use waybill::{
    Client, Document, Join, Merge, Payload, Status, StepContext, StepError, StepKind, StepOutput, Worker, Workflow,
};

mod common;
use common::{Faulty, PublishFault};

const DEADLINE: Duration = Duration::from_secs(10);

/// What the handlers did, in order: `step` for a step, `undo step` for its
/// compensation; and a watch that changes with each.
struct Calls(Mutex<Vec<String>>, tokio::sync::watch::Sender<usize>);

impl Default for Calls {
    fn default() -> Self {
        Self(Mutex::default(), tokio::sync::watch::Sender::new(0))
    }
}

impl Calls {
    fn push(&self, ctx: &StepContext) {
        let what = match ctx.kind {
            StepKind::Forward => ctx.step.to_string(),
            StepKind::Compensation => format!("undo {}", ctx.step),
        };
        self.0.lock().unwrap().push(what);
        self.1.send_modify(|n| *n += 1);
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn count(&self, what: &str) -> usize {
        self.all().iter().filter(|c| *c == what).count()
    }
}

/// `prepare`, then two branches (`left`: l1, l2; `right`: r1, r2), then
/// `finish`; every step but `finish` undone by `<step>.undo`.
fn two_branches(join: Join) -> Workflow {
    let mut b = Workflow::builder("pair", 1)
        .step("prepare", "t.prepare")
        .compensate("t.prepare.undo")
        .fork("pair");
    for side in ["l", "r"] {
        b = b.branch();
        for n in 1..=2 {
            let name = format!("{side}{n}");
            b = b
                .step(&name, format!("t.{name}"))
                .compensate(format!("t.{name}.undo"));
        }
    }
    b.join(join).step("finish", "t.finish").build().unwrap()
}

/// What a step does, by its name.
type Behaviour = Arc<dyn Fn(&str, &StepContext, Value) -> BoxedStep + Send + Sync>;
type BoxedStep = std::pin::Pin<Box<dyn std::future::Future<Output = Result<StepOutput, StepError>> + Send>>;

/// Each step (and undo) of [`two_branches`] served, logging its calls and
/// doing what `behaviour` says for the steps (undos answer `ok`).
async fn start_worker<T: Transport>(transport: T, calls: &Arc<Calls>, behaviour: Behaviour) -> waybill::WorkerHandle {
    let mut b = Worker::builder(transport);
    for step in ["prepare", "l1", "l2", "r1", "r2", "finish"] {
        let (forward, behaviour) = (calls.clone(), behaviour.clone());
        b = b.serve(format!("t.{step}"), move |ctx: StepContext, p: Payload| {
            forward.push(&ctx);
            let json: Value = serde_json::from_slice(&p.bytes).unwrap();
            behaviour(step, &ctx, json)
        });
        let undo = calls.clone();
        b = b.serve(format!("t.{step}.undo"), move |ctx: StepContext, _p: Payload| {
            undo.push(&ctx);
            async { Ok(StepOutput::ok()) }
        });
    }
    b.start().await.unwrap()
}

fn ok() -> BoxedStep {
    Box::pin(async { Ok(StepOutput::ok()) })
}

/// A step held until the test gives `gate` a permit, then answering
/// `outcome`.
fn held(gate: &Arc<tokio::sync::Semaphore>, outcome: &'static str) -> BoxedStep {
    let gate = gate.clone();
    Box::pin(async move {
        let _permit = gate.acquire().await.map_err(|_| StepError::transient("closed"))?;
        Ok(StepOutput::outcome(outcome))
    })
}

async fn finish<T: Transport>(client: &Client<T>, id: waybill::OrderId) -> Arc<Document> {
    tokio::time::timeout(DEADLINE, client.wait(id))
        .await
        .expect("the order should finish")
        .unwrap()
}

/// Waits until `cond` holds of the calls: woken by each call.
async fn until(calls: &Calls, what: &str, cond: impl Fn(&[String]) -> bool) {
    let mut changed = calls.1.subscribe();
    // The watch's reference is let go at once: it holds the value locked.
    let waited = tokio::time::timeout(DEADLINE, changed.wait_for(|_| cond(&calls.all())))
        .await
        .map(|r| r.map(|_| ()));
    assert!(matches!(waited, Ok(Ok(()))), "{what}: calls {:?}", calls.all());
}

fn steps(doc: &Document) -> Vec<String> {
    doc.history
        .iter()
        .map(|r| match r.kind {
            StepKind::Forward => r.step.to_string(),
            StepKind::Compensation => format!("undo {}", r.step),
        })
        .collect()
}

#[tokio::test]
async fn branches_run_at_the_same_time_and_the_join_merges_the_fields_each_changed() {
    let transport = Embedded::new();
    let calls = Arc::new(Calls::default());
    // l1 and r1 each wait for the other to be running: only branches that
    // run at the same time get past it.
    let both = Arc::new(tokio::sync::Barrier::new(2));
    let behaviour: Behaviour = Arc::new(move |step, _ctx, mut json| {
        let both = both.clone();
        let step = step.to_owned();
        Box::pin(async move {
            if step == "l1" || step == "r1" {
                tokio::time::timeout(DEADLINE, both.wait())
                    .await
                    .map_err(|_| StepError::permanent("the other branch never ran alongside"))?;
            }
            match step.as_str() {
                "l2" => json["flight"] = json!("held"),
                "r2" => json["hotel"] = json!("held"),
                "finish" => {
                    assert_eq!((json["flight"].as_str(), json["hotel"].as_str()), (Some("held"), Some("held")));
                }
                _ => return Ok(StepOutput::ok()),
            }
            Ok(StepOutput::ok().with_payload(Payload::json(&json).unwrap()))
        })
    });
    let worker = start_worker(transport.clone(), &calls, behaviour).await;
    let client = Client::connect(transport.clone()).await.unwrap();
    let wf = two_branches(Join::all());
    let id = client
        .start(&wf, Payload::json(&json!({"traveller": "ana"})).unwrap())
        .await
        .unwrap();
    let doc = finish(&client, id).await;
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    let json: Value = serde_json::from_slice(&doc.payload.bytes).unwrap();
    assert_eq!(json, json!({"traveller": "ana", "flight": "held", "hotel": "held"}));
    // Every branch's steps are in the order's history, once each.
    let mut got = steps(&doc);
    got.sort();
    assert_eq!(got, ["finish", "l1", "l2", "prepare", "r1", "r2"]);
    assert!(doc.branch.is_none() && doc.owed.is_empty());
    worker.shutdown().await;
    // What the branches did is kept: nothing was undone.
    assert!(calls.all().iter().all(|c| !c.starts_with("undo")), "{:?}", calls.all());
    client.close().await;
}

#[tokio::test]
async fn a_failing_branch_stops_the_others_and_every_completed_step_is_undone_newest_first() {
    let transport = Faulty::new(Embedded::new(), |_| PublishFault::Pass);
    let calls = Arc::new(Calls::default());
    // r1 is held until l2 has failed: then its branch stops before r2.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let behaviour: Behaviour = Arc::new(move |step, _ctx, _json| match step {
        "l2" => Box::pin(async { Ok(StepOutput::outcome("sold_out")) }),
        "r1" => held(&g, "ok"),
        _ => ok(),
    });
    let worker = start_worker(transport.clone(), &calls, behaviour).await;
    let client = Client::connect(transport.inner.clone()).await.unwrap();
    let id = client
        .start(&two_branches(Join::all()), Payload::json(&json!({})).unwrap())
        .await
        .unwrap();
    // The left branch failed and arrived at the join: the record's second
    // write (the fork made it).
    let mut writes = transport.join_writes.subscribe();
    // (The watch's reference is let go at once: it holds the value locked.)
    let arrived = tokio::time::timeout(DEADLINE, writes.wait_for(|n| *n >= 2))
        .await
        .map(|r| r.map(|_| ()));
    assert!(matches!(arrived, Ok(Ok(()))), "the failing branch never arrived: {:?}", calls.all());
    let (bytes, _) = transport.join_state(&id, 0).await.unwrap().unwrap();
    let record = waybill::join::decode(&waybill::Codec::default(), &bytes).unwrap();
    assert_eq!(record.arrivals.len(), 1);
    assert_eq!(record.arrivals[0].status, Status::Failed);
    gate.add_permits(1);
    let doc = finish(&client, id).await;
    assert_eq!(doc.status, Status::Compensated, "{}", doc.journal());
    assert_eq!(calls.count("r2"), 0, "the right branch stops at its next hop");
    // r1 ended last, so it is undone first; then l1, then the step before
    // the fork. l2 did nothing to undo (its outcome failed it).
    let undos: Vec<String> = calls.all().into_iter().filter(|c| c.starts_with("undo")).collect();
    assert_eq!(undos, ["undo r1", "undo l1", "undo prepare"]);
    assert!(doc.failure.as_deref().unwrap().contains("`l2` returned outcome `sold_out`"), "{:?}", doc.failure);
    assert!(doc.owed.is_empty());
    worker.shutdown().await;
    client.close().await;
}

#[tokio::test]
async fn a_join_of_the_first_branch_goes_on_and_the_late_one_undoes_itself() {
    let transport = Embedded::new();
    let calls = Arc::new(Calls::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let behaviour: Behaviour = Arc::new(move |step, _ctx, _json| match step {
        // The right branch is slow: held in its last step.
        "r2" => held(&g, "ok"),
        _ => ok(),
    });
    let worker = start_worker(transport.clone(), &calls, behaviour).await;
    let client = Client::connect(transport.clone()).await.unwrap();
    let id = client
        .start(
            &two_branches(Join::first(1).merge(Merge::Keep)),
            Payload::json(&json!({})).unwrap(),
        )
        .await
        .unwrap();
    let doc = finish(&client, id).await;
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    // Only the branch it joined is in its history.
    assert_eq!(steps(&doc), ["prepare", "l1", "l2", "finish"]);
    // The late branch completes after the order did, and undoes itself,
    // newest first.
    gate.add_permits(1);
    until(&calls, "the late branch undoes itself", |c| c.iter().any(|s| s == "undo r1")).await;
    let undos: Vec<String> = calls.all().into_iter().filter(|c| c.starts_with("undo")).collect();
    assert_eq!(undos, ["undo r2", "undo r1"]);
    worker.shutdown().await;
    client.close().await;
}

#[tokio::test]
async fn a_cancel_while_branches_run_stops_them_and_undoes_everything() {
    let transport = Embedded::new();
    let calls = Arc::new(Calls::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let behaviour: Behaviour = Arc::new(move |step, _ctx, _json| match step {
        // Both branches are held in their first step.
        "l1" | "r1" => held(&g, "ok"),
        _ => ok(),
    });
    let worker = start_worker(transport.clone(), &calls, behaviour).await;
    let client = Client::connect(transport.clone()).await.unwrap();
    let id = client
        .start(&two_branches(Join::all()), Payload::json(&json!({})).unwrap())
        .await
        .unwrap();
    until(&calls, "both branches run", |c| c.iter().any(|s| s == "l1") && c.iter().any(|s| s == "r1")).await;
    assert!(transport.request_cancel(id, "plans changed").await.unwrap());
    gate.add_permits(2);
    let doc = finish(&client, id).await;
    assert_eq!(doc.status, Status::Cancelled, "{}", doc.journal());
    assert_eq!(calls.count("l2") + calls.count("r2") + calls.count("finish"), 0, "{:?}", calls.all());
    let mut undos: Vec<String> = calls.all().into_iter().filter(|c| c.starts_with("undo")).collect();
    assert_eq!(undos.pop().as_deref(), Some("undo prepare"), "the step before the fork is undone last");
    undos.sort();
    assert_eq!(undos, ["undo l1", "undo r1"]);
    worker.shutdown().await;
    client.close().await;
}

#[tokio::test]
async fn a_hop_past_the_join_lost_after_it_was_stored_is_made_again_the_same() {
    // The first hop to `finish` is stored, but its worker hears nothing
    // back: the arrival is delivered again, finds itself in the join's
    // record, and publishes the same hop (a duplicate, stored once).
    let inner = Embedded::new();
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let l = lost.clone();
    let transport = Faulty::new(inner.clone(), move |msg| {
        if msg.subject.ends_with("t.finish") && !l.swap(true, std::sync::atomic::Ordering::SeqCst) {
            PublishFault::StoreThenFail(TransportError::Unavailable("the answer was lost".into()))
        } else {
            PublishFault::Pass
        }
    });
    let calls = Arc::new(Calls::default());
    let worker = start_worker(transport.clone(), &calls, Arc::new(|_, _, _| ok())).await;
    let client = Client::connect(inner.clone()).await.unwrap();
    let id = client
        .start(&two_branches(Join::all()), Payload::json(&json!({})).unwrap())
        .await
        .unwrap();
    let doc = finish(&client, id).await;
    assert_eq!(doc.status, Status::Completed, "{}", doc.journal());
    assert!(lost.load(std::sync::atomic::Ordering::SeqCst), "the fault was injected");
    assert_eq!(calls.count("finish"), 1, "{:?}", calls.all());
    assert_eq!(steps(&doc).iter().filter(|s| *s == "finish").count(), 1);
    worker.shutdown().await;
    client.close().await;
}

#[tokio::test]
async fn a_branch_delivered_again_after_it_moved_on_changes_nothing() {
    // r1's next hop is stored, but its worker hears nothing back, so r1 is
    // delivered again, after its branch has arrived at the join and the
    // join has decided: the delivery stops, and its arrival is a duplicate
    // of the hop that was stored, so each completed step is undone once.
    let inner = Embedded::new();
    let (lost, r1_hops) = (
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
        Arc::new(tokio::sync::watch::Sender::new(0usize)),
    );
    let (l, hops) = (lost.clone(), r1_hops.clone());
    let transport = Faulty::new(inner.clone(), move |msg| {
        if msg.subject.ends_with("t.r1") {
            hops.send_modify(|n| *n += 1);
        }
        if msg.subject.ends_with("t.r2") && !l.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // Not one a worker waits out: the input is handed back.
            PublishFault::StoreThenFail(TransportError::Other {
                message: "the connection broke".into(),
                retryable: false,
            })
        } else {
            PublishFault::Pass
        }
    });
    let calls = Arc::new(Calls::default());
    // l2 fails, once the right branch has arrived (r2 ran).
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let behaviour: Behaviour = Arc::new(move |step, _ctx, _json| match step {
        "l2" => held(&g, "sold_out"),
        _ => ok(),
    });
    let worker = start_worker(transport.clone(), &calls, behaviour).await;
    let client = Client::connect(inner.clone()).await.unwrap();
    let id = client
        .start(&two_branches(Join::all()), Payload::json(&json!({})).unwrap())
        .await
        .unwrap();
    until(&calls, "the right branch ran", |c| c.iter().any(|s| s == "r2")).await;
    gate.add_permits(1);
    let doc = finish(&client, id).await;
    assert_eq!(doc.status, Status::Compensated, "{}", doc.journal());
    // r1's second delivery made its (duplicate) arrival: the branch's
    // start, then that.
    let mut hops = r1_hops.subscribe();
    let again = tokio::time::timeout(DEADLINE, hops.wait_for(|n| *n >= 2))
        .await
        .map(|r| r.map(|_| ()));
    assert!(matches!(again, Ok(Ok(()))), "r1 was not delivered again");
    assert!(lost.load(std::sync::atomic::Ordering::SeqCst));
    worker.shutdown().await;
    assert_eq!(calls.count("r1"), 1, "a stopped delivery runs nothing: {:?}", calls.all());
    for undo in ["undo r2", "undo r1", "undo l1", "undo prepare"] {
        assert_eq!(calls.count(undo), 1, "{undo}: {:?}", calls.all());
    }
    client.close().await;
}
