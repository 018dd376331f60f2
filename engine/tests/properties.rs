//! Properties of routes, transitions and the codec, over generated inputs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use proptest::prelude::*;
use waybill::transition::{apply, Attempt, Decision, StepResult};
use waybill::{
    AttemptResult, Backoff, Codec, Document, Format, OrderId, Payload, Status, StepKind, Then, Timestamp, WorkerId,
    Workflow,
};

/// A definition drawn at random; many do not build (unreachable steps,
/// unbounded loops), and those are skipped.
#[derive(Debug, Clone)]
struct Def {
    steps: Vec<StepDef>,
}

#[derive(Debug, Clone)]
struct StepDef {
    compensated: bool,
    attempts: u32,
    max_visits: Option<u32>,
    branches: Vec<(u8, BranchTo)>,
}

#[derive(Debug, Clone)]
enum BranchTo {
    Step(usize),
    Fail,
    Complete,
    Continue,
}

const OUTCOMES: [&str; 3] = ["ok", "alt", "odd"];

fn step_def(n: usize) -> impl Strategy<Value = StepDef> {
    let branch = prop_oneof![
        (0..n).prop_map(BranchTo::Step),
        Just(BranchTo::Fail),
        Just(BranchTo::Complete),
        Just(BranchTo::Continue),
    ];
    (
        any::<bool>(),
        1u32..4,
        proptest::option::of(1u32..4),
        proptest::collection::vec((0u8..3, branch), 0..3),
    )
        .prop_map(|(compensated, attempts, max_visits, branches)| StepDef {
            compensated,
            attempts,
            max_visits,
            branches,
        })
}

fn def() -> impl Strategy<Value = Def> {
    (1usize..6).prop_flat_map(|n| proptest::collection::vec(step_def(n), n).prop_map(|steps| Def { steps }))
}

fn build(d: &Def) -> Option<Workflow> {
    let mut b = Workflow::builder("prop", 1);
    for (i, s) in d.steps.iter().enumerate() {
        b = b
            .step(format!("s{i}"), format!("svc.s{i}"))
            .retry(Backoff::fixed(s.attempts, Duration::from_millis(1)));
        if s.compensated {
            b = b.compensate(format!("svc.undo{i}"));
        }
        if let Some(v) = s.max_visits {
            b = b.max_visits(v);
        }
        let mut seen = Vec::new();
        for (o, to) in &s.branches {
            if seen.contains(o) {
                continue;
            }
            seen.push(*o);
            let then = match to {
                BranchTo::Step(j) => Then::step(format!("s{j}")),
                BranchTo::Fail => Then::Fail,
                BranchTo::Complete => Then::Complete,
                BranchTo::Continue => Then::Continue,
            };
            b = b.on(OUTCOMES[usize::from(*o)], then);
        }
    }
    b.build().ok()
}

/// What a handler does on one attempt, drawn at random.
#[derive(Debug, Clone, Copy)]
enum Act {
    Outcome(u8),
    Transient,
    Permanent,
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        6 => (0u8..3).prop_map(Act::Outcome),
        2 => Just(Act::Transient),
        1 => Just(Act::Permanent),
    ]
}

fn attempt(result: StepResult) -> Attempt {
    Attempt {
        result,
        worker: WorkerId::new("prop"),
        started_at: Timestamp(1),
        ended_at: Timestamp(2),
        jitter: 0.5,
    }
}

/// What the handler's act comes to; compensations always succeed.
fn result_of(doc: &Document, act: Act) -> StepResult {
    match (doc.status, act) {
        (Status::Compensating, _) => StepResult::ok(),
        (_, Act::Outcome(o)) => StepResult::outcome(OUTCOMES[usize::from(o)]),
        (_, Act::Transient) => StepResult::Transient("flaky".into()),
        (_, Act::Permanent) => StepResult::Permanent("broken".into()),
    }
}

/// Drives a document to its end with the given acts (cycled), compensations
/// always succeeding; returns the final document and how many attempts ran.
fn drive(wf: &Workflow, acts: &[Act]) -> (Document, usize) {
    let mut doc = Document::new(OrderId::new(), wf.shared_route(), Payload::postcard(&()).unwrap());
    let mut n = 0;
    loop {
        let before = doc.history.len();
        let result = result_of(&doc, acts[n % acts.len()]);
        let decision = apply(&mut doc, attempt(result)).expect("a running document accepts a result");
        n += 1;
        assert_eq!(doc.history.len(), before + 1, "one record per executed attempt");
        assert_eq!(doc.hop as usize, n, "one hop per attempt");
        if let Decision::Finish(status) = decision {
            assert_eq!(status, doc.status);
            assert!(status.is_terminal());
            return (doc, n);
        }
        // No valid route runs forever: each step runs at most
        // (visits bound or 1) × attempts times, plus compensations.
        assert!(n < 10_000, "route did not terminate");
    }
}

/// [`drive`], with `waits[n]` (cycled) tries on an unavailable
/// infrastructure before each real result, during compensation too.
fn drive_with_waits(wf: &Workflow, acts: &[Act], waits: &[u8]) -> (Document, usize) {
    let mut doc = Document::new(OrderId::new(), wf.shared_route(), Payload::postcard(&()).unwrap());
    let (mut n, mut hops) = (0, 0);
    loop {
        for _ in 0..waits[n % waits.len()] {
            let before = (doc.status, doc.step, doc.attempt, doc.owed.clone());
            let d = apply(&mut doc, attempt(StepResult::Unavailable("down".into()))).expect("running");
            hops += 1;
            assert!(
                matches!(d, Decision::Hop { delay: Some(_), .. }),
                "a wait never ends an order"
            );
            assert_eq!(
                (doc.status, doc.step, doc.attempt, doc.owed.clone()),
                before,
                "a wait changes nothing"
            );
            assert!(doc.history.last().is_some_and(|r| r.result.is_unavailable()));
        }
        let result = result_of(&doc, acts[n % acts.len()]);
        let decision = apply(&mut doc, attempt(result)).expect("a running document accepts a result");
        n += 1;
        hops += 1;
        assert_eq!(doc.hop as usize, hops, "one hop per attempt or wait");
        if let Decision::Finish(_) = decision {
            return (doc, n);
        }
        assert!(n < 10_000, "route did not terminate");
    }
}

/// A history without its waits on infrastructure.
fn attempts_only(doc: &Document) -> Vec<(String, StepKind, u32, AttemptResult)> {
    doc.history
        .iter()
        .filter(|r| !r.result.is_unavailable())
        .map(|r| (r.step.to_string(), r.kind, r.attempt, r.result.clone()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// An outage delays an order; it never changes how it ends: with any
    /// number of waits on an unavailable infrastructure anywhere (forward or
    /// compensating), the order ends as it would without them, through the
    /// same attempts, and the waits fold into one record each.
    #[test]
    fn waits_on_infrastructure_never_change_how_an_order_ends(
        d in def(),
        acts in proptest::collection::vec(act(), 1..12),
        waits in proptest::collection::vec(0u8..20, 1..12),
    ) {
        let Some(wf) = build(&d) else { return Ok(()) };
        let (plain, n_plain) = drive(&wf, &acts);
        let (waited, n_waited) = drive_with_waits(&wf, &acts, &waits);
        prop_assert_eq!(n_plain, n_waited);
        prop_assert_eq!(waited.status, plain.status);
        prop_assert_eq!(&waited.failure, &plain.failure);
        prop_assert_eq!(&waited.owed, &plain.owed);
        prop_assert_eq!(attempts_only(&waited), attempts_only(&plain));
        for pair in waited.history.windows(2) {
            prop_assert!(!(pair[0].result.is_unavailable() && pair[1].result.is_unavailable()), "waits fold");
        }
    }

    #[test]
    fn every_valid_route_terminates(d in def(), acts in proptest::collection::vec(act(), 1..12)) {
        let Some(wf) = build(&d) else { return Ok(()) };
        let (doc, _) = drive(&wf, &acts);
        prop_assert!(doc.status.is_terminal());
    }

    #[test]
    fn compensations_run_newest_first_once_per_completed_step(
        d in def(),
        acts in proptest::collection::vec(act(), 1..12),
    ) {
        let Some(wf) = build(&d) else { return Ok(()) };
        let (doc, _) = drive(&wf, &acts);
        // Steps that owe an undo: forward records whose outcome moved the
        // order on (not a failing or unmapped outcome), and steps that ran
        // out of attempts on transient errors.
        let route = &doc.route;
        let mut owed = Vec::new();
        let mut undone = Vec::new();
        for r in &doc.history {
            match (r.kind, &r.result) {
                (StepKind::Forward, AttemptResult::Outcome(o)) => {
                    let step = route.step_by_name(&r.step).unwrap();
                    let moved_on = match step.next_for(&o.parse().unwrap()) {
                        Some(waybill::Next::Fail) | None => false,
                        Some(_) => true,
                    };
                    if moved_on && step.compensate.is_some() {
                        owed.push(r.step.clone());
                    }
                }
                // A step whose attempts ran out on transient errors may
                // have done part of its work: it owes its undo too.
                (StepKind::Forward, AttemptResult::Error { transient: true, .. }) => {
                    let step = route.step_by_name(&r.step).unwrap();
                    if r.attempt >= step.retry.max_attempts && step.compensate.is_some() {
                        owed.push(r.step.clone());
                    }
                }
                (StepKind::Compensation, _) => undone.push(r.step.clone()),
                _ => {}
            }
        }
        match doc.status {
            Status::Completed => prop_assert!(undone.is_empty(), "a completed order undid something"),
            Status::Compensated => {
                owed.reverse();
                prop_assert_eq!(undone, owed, "compensations must run newest first, once each");
            }
            Status::Failed => prop_assert!(undone.is_empty() && owed.is_empty()),
            other => prop_assert!(false, "unexpected status {other}"),
        }
    }

    #[test]
    fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let c = Codec::default();
        let _ = c.decode(&bytes, Format::Postcard);
        let _ = c.decode(&bytes, Format::Json);
        let mut framed = b"WB\x01".to_vec();
        framed.extend_from_slice(&bytes);
        let _ = c.decode(&framed, Format::Postcard);
    }

    #[test]
    fn decoding_mutated_documents_never_panics(
        d in def(),
        acts in proptest::collection::vec(act(), 1..6),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let Some(wf) = build(&d) else { return Ok(()) };
        let (doc, _) = drive(&wf, &acts);
        let c = Codec::default();
        for format in [Format::Postcard, Format::Json] {
            let bytes = c.encode(&doc, format).unwrap();
            prop_assert_eq!(&c.decode(&bytes, format).unwrap(), &doc);
            let mut m = bytes.clone();
            for (at, v) in &flips {
                let i = at.index(m.len());
                m[i] ^= v;
            }
            let _ = c.decode(&m, format);
            let _ = c.decode(&bytes[..cut.index(bytes.len())], format);
        }
    }
}

#[test]
fn the_generator_makes_mostly_buildable_routes() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = def();
    let built = (0..400)
        .filter(|_| build(&strategy.new_tree(&mut runner).unwrap().current()).is_some())
        .count();
    // Otherwise the properties above would test little.
    assert!(built > 100, "only {built} of 400 generated routes build");
}
