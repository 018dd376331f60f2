use super::*;

fn three() -> WorkflowBuilder {
    Workflow::builder("order", 1)
        .step("charge", "payment.charge")
        .compensate("payment.refund")
        .step("reserve", "inventory.reserve")
        .compensate("inventory.release")
        .step("ship", "shipping.dispatch")
}

#[test]
fn a_good_route_builds() {
    let wf = three().build().unwrap();
    assert_eq!(wf.route().steps.len(), 3);
    assert_eq!(wf.services().len(), 5);
}

#[test]
fn errors_name_the_problem() {
    let e = Workflow::builder("order", 1).build().unwrap_err();
    assert!(matches!(e, DefinitionError::NoSteps { .. }), "{e}");

    let e = three().step("charge", "x.y").build().unwrap_err();
    assert_eq!(
        e,
        DefinitionError::DuplicateStep {
            workflow: "order".into(),
            step: "charge".into()
        }
    );

    let e = three().on("lost", Then::step("nowhere")).build().unwrap_err();
    assert!(e.to_string().contains("unknown step `nowhere`"), "{e}");

    let e = Workflow::builder("order", 1)
        .step("a", "s.a")
        .on("ok", Then::Complete)
        .step("b", "s.b")
        .build()
        .unwrap_err();
    assert_eq!(
        e,
        DefinitionError::Unreachable {
            workflow: "order".into(),
            step: "b".into()
        }
    );

    let e = Workflow::builder("order", 1)
        .step("a", "s.a")
        .step("b", "s.b")
        .on("again", Then::step("a"))
        .build()
        .unwrap_err();
    assert!(
        matches!(e, DefinitionError::UnboundedLoop { ref cycle, .. } if cycle == &["a", "b"]),
        "{e}"
    );

    let e = three().step("bad", "has space").build().unwrap_err();
    assert!(e.to_string().contains("has space"), "{e}");

    let e = three().retry(Backoff::fixed(0, Duration::ZERO)).build().unwrap_err();
    assert!(e.to_string().contains("0 attempts"), "{e}");

    let e = three().on("x", Then::Fail).on("x", Then::Complete).build().unwrap_err();
    assert!(matches!(e, DefinitionError::DuplicateOutcome { .. }), "{e}");

    let e = Workflow::builder("order", 0).step("a", "s.a").build().unwrap_err();
    assert!(matches!(e, DefinitionError::BadVersion { .. }), "{e}");

    let e = three().delay(Duration::ZERO).build().unwrap_err();
    assert_eq!(
        e.to_string(),
        "workflow `order`: step `ship`: a delay must be longer than zero"
    );
    let e = three().delay(MAX_DELAY + Duration::from_secs(1)).build().unwrap_err();
    assert!(
        matches!(e, DefinitionError::BadStep { ref problem, .. } if problem.contains("a year")),
        "{e}"
    );
    let e = Workflow::builder("order", 1)
        .step("a", "s.a")
        .not_before("ship_at")
        .build()
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("the first step cannot wait until a payload time"),
        "{e}"
    );
    for bad in ["", "a..b", ".a"] {
        let e = three().not_before(bad).build().unwrap_err();
        assert!(e.to_string().contains("is not a payload field"), "{bad:?}: {e}");
    }
    three().not_before("delivery.at").build().unwrap();
    let wf = three().delay(MAX_DELAY).build().unwrap();
    assert_eq!(wf.route().steps[2].wait, Some(Wait::delay(MAX_DELAY)));
}

#[test]
fn a_bounded_loop_builds() {
    Workflow::builder("order", 1)
        .step("a", "s.a")
        .max_visits(3)
        .step("b", "s.b")
        .on("again", Then::step("a"))
        .build()
        .unwrap();
    // A self-loop must be bounded too.
    let e = Workflow::builder("poll", 1)
        .step("wait", "s.wait")
        .on("not_yet", Then::step("wait"))
        .build()
        .unwrap_err();
    assert!(matches!(e, DefinitionError::UnboundedLoop { .. }), "{e}");
}

#[test]
fn backoff_grows_and_is_capped() {
    let b = Backoff::exponential(5, Duration::from_millis(50)).with_jitter(0.0);
    assert_eq!(b.delay(1, 0.5), Duration::from_millis(50));
    assert_eq!(b.delay(2, 0.5), Duration::from_millis(100));
    assert_eq!(b.delay(3, 0.5), Duration::from_millis(200));
    let capped = b.with_max_delay(Duration::from_millis(120));
    assert_eq!(capped.delay(4, 0.5), Duration::from_millis(120));
    let j = Backoff::exponential(5, Duration::from_millis(100));
    assert_eq!(j.delay(1, 0.0), Duration::from_millis(80));
    assert_eq!(j.delay(1, 1.0), Duration::from_millis(120));
}

#[test]
fn a_signal_wait_is_checked_like_the_rest_of_the_route() {
    let wf = three()
        .await_signal("approved", Duration::from_secs(60))
        .on_timeout(Then::step("charge"))
        .max_visits(3)
        .build()
        .unwrap();
    let ship = &wf.route().steps[2];
    assert_eq!(
        ship.wait,
        Some(Wait::Signal {
            name: "approved".parse().unwrap(),
            timeout_ms: 60_000,
            on_timeout: Next::Goto(0),
        })
    );
    // The last wait given is the step's.
    let wf = three()
        .await_signal("approved", Duration::from_secs(60))
        .delay(Duration::from_secs(1))
        .build()
        .unwrap();
    assert_eq!(wf.route().steps[2].awaits(), None);

    let e = three().await_signal("approved", Duration::ZERO).build().unwrap_err();
    assert!(
        matches!(&e, DefinitionError::BadStep { step, .. } if step == "ship"),
        "a zero deadline is the step's problem: {e}"
    );
    let e = three().await_signal("ok!", Duration::from_secs(1)).build().unwrap_err();
    assert!(
        matches!(
            &e,
            DefinitionError::BadName {
                source: NameError::BadCharacter {
                    kind: "signal name",
                    bad: '!',
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
    let e = three()
        .await_signal("approved", Duration::from_secs(1))
        .on_timeout(Then::step("nowhere"))
        .build()
        .unwrap_err();
    assert!(
        matches!(&e, DefinitionError::UnknownStep { from, to, .. } if from == "ship" && to == "nowhere"),
        "{e}"
    );
    // A timeout that loops back must be bounded, as any loop.
    let e = three()
        .await_signal("approved", Duration::from_secs(1))
        .on_timeout(Then::step("reserve"))
        .build()
        .unwrap_err();
    assert!(matches!(e, DefinitionError::UnboundedLoop { .. }), "{e}");
    // Only a timeout reaches a step after a completing one.
    let wf = Workflow::builder("remind", 1)
        .step("wait", "s.wait")
        .await_signal("approved", Duration::from_secs(1))
        .on_timeout(Then::step("nudge"))
        .on("ok", Then::Complete)
        .step("nudge", "s.nudge")
        .build();
    assert!(wf.is_ok(), "{wf:?}");
}

/// `a`, a fork of two branches (`l`; `r1`, `r2`), then `z`.
fn forked() -> WorkflowBuilder {
    Workflow::builder("f", 1)
        .step("a", "s.a")
        .fork("pair")
        .branch()
        .step("l", "s.l")
        .branch()
        .step("r1", "s.r1")
        .step("r2", "s.r2")
}

fn fork_problem(b: WorkflowBuilder) -> String {
    match b.build() {
        Err(DefinitionError::BadFork { problem, .. }) => problem,
        other => panic!("expected a fork refused, got {other:?}"),
    }
}

#[test]
fn a_fork_lays_its_branches_out_and_knows_where_each_step_leads() {
    let wf = forked().join(Join::all()).step("z", "s.z").build().unwrap();
    let r = wf.route();
    assert_eq!(r.forks.len(), 1);
    let f = &r.forks[0];
    assert_eq!((f.starts.clone(), f.end), (vec![1, 2], 4));
    assert_eq!(f.needed(), 2);
    assert_eq!(r.branch_of(3), Some((0, 1)));
    assert_eq!(r.branch_of(4), None);
    // The step before the fork enters it; a branch's last step joins.
    assert_eq!(r.onward(0, Next::Continue), Onward::Fork(0));
    assert_eq!(r.onward(1, Next::Continue), Onward::Join(0));
    assert_eq!(r.onward(2, Next::Continue), Onward::Step(3));
    assert_eq!(r.onward(3, Next::Continue), Onward::Join(0));
    assert_eq!(r.onward(3, Next::Complete), Onward::Join(0));
    assert_eq!(r.onward(4, Next::Continue), Onward::Complete);
    // A join may lead straight into another fork.
    let two = forked()
        .join(Join::first(1).merge(Merge::Keep))
        .fork("more")
        .branch()
        .step("m1", "s.m1")
        .branch()
        .step("m2", "s.m2")
        .join(Join::all())
        .build()
        .unwrap();
    assert_eq!(two.route().forks[1].starts, [4, 5]);
    assert_eq!(two.route().forks[0].join, Join::first(1).merge(Merge::Keep));
}

#[test]
fn unbalanced_or_crossed_forks_are_refused_with_the_reason() {
    let cases: Vec<(WorkflowBuilder, &str)> = vec![
        (three().join(Join::all()), "a join without a fork"),
        (three().branch(), "a branch outside a fork"),
        (forked(), "fork `pair` has no join"),
        (
            Workflow::builder("f", 1).step("a", "s.a").fork("x").branch().step("b", "s.b").join(Join::all()),
            "a fork runs two at least",
        ),
        (
            Workflow::builder("f", 1)
                .step("a", "s.a")
                .fork("x")
                .branch()
                .branch()
                .step("b", "s.b")
                .join(Join::all()),
            "branch 1 of fork `x` has no steps",
        ),
        (
            Workflow::builder("f", 1).fork("x").branch().step("a", "s.a").branch().step("b", "s.b").join(Join::all()),
            "is the route's start",
        ),
        (
            Workflow::builder("f", 1)
                .step("a", "s.a")
                .fork("x")
                .step("stray", "s.stray")
                .branch()
                .step("b", "s.b")
                .branch()
                .step("c", "s.c")
                .join(Join::all()),
            "steps before its first branch",
        ),
        (forked().join(Join::first(3)), "joins the first 3 of its 2 branches"),
        (forked().join(Join::first(0)), "joins the first 0"),
        (
            Workflow::builder("f", 1)
                .step("a", "s.a")
                .fork("x")
                .branch()
                .step("b", "s.b")
                .fork("y")
                .branch()
                .step("c", "s.c")
                .branch()
                .step("d", "s.d")
                .join(Join::all())
                .join(Join::all()),
            "forks do not nest",
        ),
        (
            forked().on("done", Then::step("l")).join(Join::all()),
            "step `r2` leads out of its branch to `l`",
        ),
        (
            Workflow::builder("f", 1)
                .step("a", "s.a")
                .on("skip", Then::step("r2"))
                .fork("pair")
                .branch()
                .step("l", "s.l")
                .branch()
                .step("r1", "s.r1")
                .step("r2", "s.r2")
                .join(Join::all()),
            "step `a` leads into branch 2 of fork `pair` from outside it",
        ),
        (
            forked()
                .join(Join::all())
                .step("z", "s.z")
                .on("again", Then::step("a"))
                .max_visits(3),
            "a loop across the join of fork `pair`",
        ),
    ];
    for (builder, want) in cases {
        let got = fork_problem(builder);
        assert!(got.contains(want), "{got:?} should say {want:?}");
    }
}

#[test]
fn the_graph_draws_a_fork_into_each_branch_and_each_branch_through_its_join() {
    let wf = forked().join(Join::first(1)).step("z", "s.z").build().unwrap();
    let m = graph::draw(wf.route(), graph::GraphFormat::Mermaid);
    for want in [
        "s0 -- \"ok, fork pair\" --> s1",
        "s0 -- \"ok, fork pair\" --> s2",
        "s1 -- \"ok, join pair: first 1\" --> s4",
        "s2 -- \"ok\" --> s3",
        "s3 -- \"ok, join pair: first 1\" --> s4",
    ] {
        assert!(m.contains(want), "{want} missing from\n{m}");
    }
    // Not into the next branch, as a route without forks would go on.
    assert!(!m.contains("s1 -- \"ok\" --> s2"), "{m}");
}
