//! The builder users write definitions with.

use std::time::Duration;

use super::{
    duration_ms, Backoff, Branch, DefinitionError, Fork, Join, Next, Route, RouteStep, Then, Wait, Workflow, MAX_BRANCHES,
    MAX_STEPS,
};
use crate::id::{Outcome, ServiceSubject, SignalName, StepName, WorkflowName};

impl Workflow {
    /// Starts a definition of workflow `name`, version `version` (≥ 1).
    pub fn builder(name: impl Into<String>, version: u32) -> WorkflowBuilder {
        WorkflowBuilder {
            name: name.into(),
            version,
            steps: Vec::new(),
            forks: Vec::new(),
            misuse: None,
        }
    }
}

/// A fork as written: where each branch starts (by step count), and where
/// and how it joins once `join` is given.
struct ForkDraft {
    name: String,
    /// Steps before the fork.
    at: usize,
    starts: Vec<usize>,
    joined: Option<(usize, Join)>,
}

struct StepDraft {
    name: String,
    service: String,
    compensate: Option<String>,
    retry: Backoff,
    timeout: Duration,
    branches: Vec<(String, Then)>,
    max_visits: Option<u32>,
    wait: Option<Wait>,
    /// A signal's name, deadline and where its timeout leads.
    signal: Option<(String, Duration, Then)>,
}

/// Builds a [`Workflow`]. Methods after `step(…)` configure that step.
/// Nothing is checked until [`build`](Self::build), which checks everything.
#[must_use]
pub struct WorkflowBuilder {
    name: String,
    version: u32,
    steps: Vec<StepDraft>,
    forks: Vec<ForkDraft>,
    /// The first fork, branch or join given out of place.
    misuse: Option<String>,
}

impl std::fmt::Debug for WorkflowBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowBuilder")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &self.steps.len())
            .field("forks", &self.forks.len())
            .finish()
    }
}

/// The timeout of a step that names none.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);

impl WorkflowBuilder {
    /// Adds a step named `name` served by `service`.
    pub fn step(mut self, name: impl Into<String>, service: impl Into<String>) -> Self {
        self.steps.push(StepDraft {
            name: name.into(),
            service: service.into(),
            compensate: None,
            retry: Backoff::default(),
            timeout: DEFAULT_STEP_TIMEOUT,
            branches: Vec::new(),
            max_visits: None,
            wait: None,
            signal: None,
        });
        self
    }

    fn last(&mut self) -> Option<&mut StepDraft> {
        self.steps.last_mut()
    }

    /// The service that undoes the last step if a later one fails.
    pub fn compensate(mut self, service: impl Into<String>) -> Self {
        if let Some(s) = self.last() {
            s.compensate = Some(service.into());
        }
        self
    }

    /// Retry policy of the last step for transient errors.
    pub fn retry(mut self, backoff: Backoff) -> Self {
        if let Some(s) = self.last() {
            s.retry = backoff;
        }
        self
    }

    /// Longest one attempt of the last step may run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        if let Some(s) = self.last() {
            s.timeout = timeout;
        }
        self
    }

    /// Where `outcome` of the last step leads.
    pub fn on(mut self, outcome: impl Into<String>, then: Then) -> Self {
        if let Some(s) = self.last() {
            s.branches.push((outcome.into(), then));
        }
        self
    }

    /// Most times the last step may be entered; bounds any loop through it.
    pub fn max_visits(mut self, visits: u32) -> Self {
        if let Some(s) = self.last() {
            s.max_visits = Some(visits);
        }
        self
    }

    /// Makes the order wait `delay` before the last step runs, each time
    /// it enters it: counted from when the step before it ended (from the
    /// start, for the first step). A waiting order holds no worker, task or
    /// lease: its next hop is stored with the time it is due (over NATS,
    /// scheduled by the server), so a restart or a deploy loses nothing.
    pub fn delay(mut self, delay: Duration) -> Self {
        if let Some(s) = self.last() {
            s.wait = Some(Wait::delay(delay));
            s.signal = None;
        }
        self
    }

    /// Makes the order wait, before the last step runs, until the time the
    /// payload's `field` holds (a name in its JSON form, or a dotted path:
    /// `delivery.not_before`), written as an RFC 3339 time or as
    /// milliseconds since the epoch. It is read as the step is entered,
    /// each time; a time already past is no wait. A payload without it, or
    /// with something else there, fails the order, naming the field. Not
    /// on the first step (no worker reads the payload before it). The
    /// worker entering the step reads a JSON payload itself, a binary one
    /// through its registry ([`crate::WorkerBuilder::registry`]).
    pub fn not_before(mut self, field: impl Into<String>) -> Self {
        if let Some(s) = self.last() {
            s.wait = Some(Wait::Until {
                field: field.into().into(),
            });
            s.signal = None;
        }
        self
    }

    /// Makes the order wait, before the last step runs, for the signal
    /// `name` (`waybill signal <order> <name> [JSON]`, or a request on
    /// `waybill.signal.<order>.<name>`), at most `deadline` after the step
    /// before it ended. The signal's JSON is kept in the document under its
    /// name ([`crate::Document::signal`], [`crate::StepContext::signal`]).
    /// A signal delivered before the order reaches the step is kept and
    /// used when it gets there; a duplicate is answered `duplicate` and
    /// applied once. Past the deadline without it, the route goes where
    /// [`on_timeout`](Self::on_timeout) says (by default it fails the order,
    /// undoing what was done), and the step does not run. The waiting order
    /// holds no worker: its hop is stored due at the deadline and woken by
    /// the signal.
    pub fn await_signal(mut self, name: impl Into<String>, deadline: Duration) -> Self {
        if let Some(s) = self.last() {
            s.signal = Some((name.into(), deadline, Then::Fail));
            s.wait = None;
        }
        self
    }

    /// Where the order goes when the last step's signal does not come by
    /// its deadline (see [`await_signal`](Self::await_signal)): `Then::Fail`
    /// (the default) undoes what was done, `Then::Continue` skips the step,
    /// `Then::step(…)` goes to another.
    pub fn on_timeout(mut self, then: Then) -> Self {
        if let Some((_, _, t)) = self.last().and_then(|s| s.signal.as_mut()) {
            *t = then;
        }
        self
    }

    /// Opens a fork named `name`: the branches that follow (each begun by
    /// [`branch`](Self::branch)) run at the same time, each with its own
    /// copy of the document, until [`join`](Self::join). The step before
    /// the fork leads into it. A branch is its steps, configured as any
    /// (outcomes lead within the branch; the way on past its last step,
    /// or `Then::Complete`, finishes the branch). A branch that fails
    /// stops the others at their next hop, and every branch's completed
    /// steps are undone, newest first, then the steps before the fork.
    pub fn fork(mut self, name: impl Into<String>) -> Self {
        if self.forks.last().is_some_and(|f| f.joined.is_none()) {
            self.misused("a fork inside a fork's branch: forks do not nest");
        }
        let at = self.steps.len();
        self.forks.push(ForkDraft {
            name: name.into(),
            at,
            starts: Vec::new(),
            joined: None,
        });
        self
    }

    /// Begins a branch of the open fork: the steps that follow, up to the
    /// next `branch` or the `join`.
    pub fn branch(mut self) -> Self {
        let at = self.steps.len();
        match self.forks.last_mut() {
            Some(f) if f.joined.is_none() => f.starts.push(at),
            _ => self.misused("a branch outside a fork: begin the fork with `fork(name)`"),
        }
        self
    }

    /// Closes the open fork: the order goes on to the steps that follow
    /// once the branches `join` waits for have completed (all of them, or
    /// the first n), their payloads merged as it says.
    pub fn join(mut self, join: Join) -> Self {
        let at = self.steps.len();
        match self.forks.last_mut() {
            Some(f) if f.joined.is_none() => f.joined = Some((at, join)),
            _ => self.misused("a join without a fork: begin the fork with `fork(name)`"),
        }
        self
    }

    fn misused(&mut self, problem: &str) {
        self.misuse.get_or_insert_with(|| problem.to_owned());
    }

    /// The forks as the route holds them, each checked for balance: ended
    /// by a join, two branches at least, none of them empty.
    fn built_forks(&self) -> Result<Vec<Fork>, DefinitionError> {
        let bad = |problem: String| DefinitionError::BadFork {
            workflow: self.name.clone(),
            problem,
        };
        if let Some(problem) = &self.misuse {
            return Err(bad(problem.clone()));
        }
        let mut forks = Vec::with_capacity(self.forks.len());
        for f in &self.forks {
            let Some((end, join)) = f.joined else {
                return Err(bad(format!("fork `{}` has no join", f.name)));
            };
            if f.starts.len() < 2 {
                return Err(bad(format!(
                    "fork `{}` has {} branch(es); a fork runs two at least",
                    f.name,
                    f.starts.len()
                )));
            }
            if f.starts.first() != Some(&f.at) {
                return Err(bad(format!(
                    "fork `{}` has steps before its first branch: begin each branch with `branch()`",
                    f.name
                )));
            }
            if f.at == 0 {
                return Err(bad(format!(
                    "fork `{}` is the route's start: put a step before it (the step before a fork enters it)",
                    f.name
                )));
            }
            if f.starts.len() > MAX_BRANCHES {
                return Err(bad(format!(
                    "fork `{}` has {} branches; at most {MAX_BRANCHES} are allowed",
                    f.name,
                    f.starts.len()
                )));
            }
            let bounds: Vec<usize> = f.starts.iter().copied().chain([end]).collect();
            if let Some(i) = bounds.windows(2).position(|w| w[0] >= w[1]) {
                return Err(bad(format!("branch {} of fork `{}` has no steps", i + 1, f.name)));
            }
            if let Some(n) = join.first {
                if n == 0 || usize::from(n) > f.starts.len() {
                    return Err(bad(format!(
                        "fork `{}` joins the first {n} of its {} branches",
                        f.name,
                        f.starts.len()
                    )));
                }
            }
            let index = |i: usize| u16::try_from(i).unwrap_or(u16::MAX);
            forks.push(Fork {
                name: StepName::new(f.name.clone()).map_err(|source| DefinitionError::BadName {
                    workflow: self.name.clone(),
                    source,
                })?,
                starts: f.starts.iter().map(|&i| index(i)).collect(),
                end: index(end),
                join,
            });
        }
        Ok(forks)
    }

    /// Validates the definition and returns the workflow, or the first
    /// problem found.
    pub fn build(self) -> Result<Workflow, DefinitionError> {
        let workflow = self.name.clone();
        let bad_name = |source| DefinitionError::BadName {
            workflow: workflow.clone(),
            source,
        };
        let name = WorkflowName::new(self.name.clone()).map_err(bad_name)?;
        if self.steps.len() > MAX_STEPS {
            return Err(DefinitionError::TooManySteps {
                workflow,
                count: self.steps.len(),
            });
        }
        let index_of = |wanted: &str| self.steps.iter().position(|s| s.name == wanted);
        let resolve = |from: &str, outcome: &str, then: &Then| match then {
            Then::Continue => Ok(Next::Continue),
            Then::Fail => Ok(Next::Fail),
            Then::Complete => Ok(Next::Complete),
            Then::Step(to) => match index_of(to) {
                // Below MAX_STEPS, so the index fits.
                Some(i) => Ok(Next::Goto(u16::try_from(i).unwrap_or(u16::MAX))),
                None => Err(DefinitionError::UnknownStep {
                    workflow: workflow.clone(),
                    from: from.to_owned(),
                    outcome: outcome.to_owned(),
                    to: to.clone(),
                }),
            },
        };
        let mut steps = Vec::with_capacity(self.steps.len());
        for draft in &self.steps {
            let mut branches = Vec::with_capacity(draft.branches.len());
            for (outcome, then) in &draft.branches {
                let next = resolve(&draft.name, outcome, then)?;
                branches.push(Branch {
                    outcome: Outcome::new(outcome.clone()).map_err(bad_name)?,
                    next,
                });
            }
            steps.push(RouteStep {
                name: StepName::new(draft.name.clone()).map_err(bad_name)?,
                service: ServiceSubject::new(draft.service.clone()).map_err(bad_name)?,
                compensate: draft
                    .compensate
                    .clone()
                    .map(ServiceSubject::new)
                    .transpose()
                    .map_err(bad_name)?,
                retry: draft.retry,
                timeout_ms: duration_ms(draft.timeout),
                branches,
                max_visits: draft.max_visits,
                wait: match &draft.signal {
                    // A step has one wait, the last one given; a signal's
                    // is kept apart until its `on_timeout` is resolved.
                    Some((name, deadline, then)) => Some(Wait::Signal {
                        name: SignalName::new(name).map_err(bad_name)?,
                        timeout_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
                        on_timeout: resolve(&draft.name, "a signal's timeout", then)?,
                    }),
                    None => draft.wait.clone(),
                },
            });
        }
        let forks = self.built_forks()?;
        Workflow::from_route(Route {
            workflow: name,
            version: self.version,
            steps,
            forks,
        })
    }
}
