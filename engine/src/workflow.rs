//! Workflow definitions: the builder users write, and the [`Route`] that is
//! copied into every document at start.
//!
//! A route is a list of steps. After a step, its *outcome* picks what comes
//! next: `ok` goes on to the following step unless the route says otherwise,
//! other outcomes go where `on(outcome, …)` sends them, and an outcome the
//! route does not name fails the order. `build()` refuses a route that could
//! surprise at run time: duplicate or unknown step names, unreachable steps,
//! loops without a bound.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::id::{NameError, Outcome, ServiceSubject, StepName, WorkflowName};

/// Most steps a route may have: the cursor is a `u16` and a route travels in
/// every document, so it must stay small.
pub const MAX_STEPS: usize = 256;

/// Why a workflow definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    #[error("workflow `{workflow}` has no steps")]
    NoSteps { workflow: String },
    #[error("workflow `{workflow}` has {count} steps; at most {MAX_STEPS} are allowed")]
    TooManySteps { workflow: String, count: usize },
    #[error("workflow `{workflow}`: {source}")]
    BadName {
        workflow: String,
        #[source]
        source: NameError,
    },
    #[error("workflow `{workflow}` version must be at least 1")]
    BadVersion { workflow: String },
    #[error("workflow `{workflow}` defines step `{step}` twice")]
    DuplicateStep { workflow: String, step: String },
    #[error("workflow `{workflow}`: step `{from}` branches on `{outcome}` to unknown step `{to}`")]
    UnknownStep {
        workflow: String,
        from: String,
        outcome: String,
        to: String,
    },
    #[error("workflow `{workflow}`: step `{step}` maps outcome `{outcome}` twice")]
    DuplicateOutcome {
        workflow: String,
        step: String,
        outcome: String,
    },
    #[error("workflow `{workflow}`: step `{step}` can never be reached from the first step")]
    Unreachable { workflow: String, step: String },
    #[error("workflow `{workflow}`: the loop {} has no bound; give one of its steps `.max_visits(n)`", .cycle.join(" -> "))]
    UnboundedLoop { workflow: String, cycle: Vec<String> },
    #[error("workflow `{workflow}`: step `{step}`: {problem}")]
    BadStep {
        workflow: String,
        step: String,
        problem: String,
    },
}

/// When and how often a failed step is tried again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Attempts in all, the first one included. `1` means no retry.
    pub max_attempts: u32,
    /// Delay before the second attempt, in milliseconds.
    pub initial_ms: u32,
    /// Upper bound of any delay, in milliseconds.
    pub max_ms: u32,
    /// Each delay is the previous one times this.
    pub multiplier: f32,
    /// Fraction of the delay that is randomised, 0 to 1 (0.2 = ±20 %).
    pub jitter: f32,
}

impl Backoff {
    /// No retry: the first failure is final.
    pub const fn none() -> Self {
        Self {
            max_attempts: 1,
            initial_ms: 0,
            max_ms: 0,
            multiplier: 1.0,
            jitter: 0.0,
        }
    }

    /// Up to `max_attempts` attempts, the delay doubling from `initial`, capped
    /// at 30 s, with ±20 % jitter.
    pub fn exponential(max_attempts: u32, initial: Duration) -> Self {
        Self {
            max_attempts,
            initial_ms: duration_ms(initial),
            max_ms: 30_000,
            multiplier: 2.0,
            jitter: 0.2,
        }
    }

    /// Up to `max_attempts` attempts, `delay` apart, without jitter.
    pub fn fixed(max_attempts: u32, delay: Duration) -> Self {
        let ms = duration_ms(delay);
        Self {
            max_attempts,
            initial_ms: ms,
            max_ms: ms,
            multiplier: 1.0,
            jitter: 0.0,
        }
    }

    pub fn with_max_delay(mut self, max: Duration) -> Self {
        self.max_ms = duration_ms(max);
        self
    }

    pub fn with_jitter(mut self, jitter: f32) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay after failed attempt number `attempt` (1-based). `unit` is a
    /// random number in `[0, 1)` that places the jitter: passing it in keeps
    /// this function pure.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let base = f64::from(self.initial_ms) * f64::from(self.multiplier).powi(exp);
        let base = base.min(f64::from(self.max_ms));
        let jitter = f64::from(self.jitter.clamp(0.0, 1.0));
        let factor = 1.0 + jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        let ms = (base * factor).clamp(0.0, f64::from(self.max_ms.max(1)) * 2.0);
        Duration::from_micros((ms * 1000.0).round() as u64)
    }

    fn problem(&self) -> Option<String> {
        if self.max_attempts == 0 {
            return Some("retry policy allows 0 attempts; at least 1 is needed".into());
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Some(format!(
                "retry multiplier {} must be a finite number ≥ 1",
                self.multiplier
            ));
        }
        if !(self.jitter.is_finite() && (0.0..=1.0).contains(&self.jitter)) {
            return Some(format!("retry jitter {} must be within 0..=1", self.jitter));
        }
        if self.initial_ms > self.max_ms {
            return Some(format!(
                "initial retry delay {} ms exceeds the maximum delay {} ms",
                self.initial_ms, self.max_ms
            ));
        }
        None
    }
}

impl Default for Backoff {
    /// Three attempts, 100 ms then 200 ms apart (with jitter).
    fn default() -> Self {
        Self::exponential(3, Duration::from_millis(100))
    }
}

fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Where an outcome leads, in a built route (steps by index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The following step, or completion after the last one.
    Continue,
    /// The step with this index.
    Goto(u16),
    /// The order fails: owed compensations run, newest first.
    Fail,
    /// The order is complete.
    Complete,
}

/// Where an outcome leads, as written in a definition (steps by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Then {
    /// The following step, or completion after the last one.
    Continue,
    /// The named step.
    Step(String),
    /// Fail the order (compensating what was done).
    Fail,
    /// Complete the order.
    Complete,
}

impl Then {
    pub fn step(name: impl Into<String>) -> Self {
        Self::Step(name.into())
    }
}

/// One outcome-to-next mapping of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Branch {
    pub outcome: Outcome,
    pub next: Next,
}

/// One step of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteStep {
    pub name: StepName,
    pub service: ServiceSubject,
    /// The service that undoes this step, if it needs undoing.
    pub compensate: Option<ServiceSubject>,
    pub retry: Backoff,
    /// Longest one attempt may run, in milliseconds.
    pub timeout_ms: u32,
    /// Outcome mappings; `ok` continues unless mapped here.
    pub branches: Vec<Branch>,
    /// Most times the step may be entered (bounds loops through it).
    pub max_visits: Option<u32>,
}

impl RouteStep {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.timeout_ms))
    }

    /// Where `outcome` leads from this step; `None` when the route does not
    /// map it (which fails the order).
    pub fn next_for(&self, outcome: &Outcome) -> Option<Next> {
        match self.branches.iter().find(|b| &b.outcome == outcome) {
            Some(b) => Some(b.next),
            None if outcome.is_ok() => Some(Next::Continue),
            None => None,
        }
    }
}

/// A workflow's route: what every document started with it carries. Its
/// wire form is defined in [`crate::codec`], not by this struct.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub workflow: WorkflowName,
    pub version: u32,
    pub steps: Vec<RouteStep>,
}

impl Route {
    pub fn step(&self, index: u16) -> Option<&RouteStep> {
        self.steps.get(usize::from(index))
    }

    pub fn step_by_name(&self, name: &StepName) -> Option<&RouteStep> {
        self.steps.iter().find(|s| &s.name == name)
    }

    /// The structural checks a route off the wire must pass before anything
    /// follows it: steps exist, indices point inside, values are sane. Cheap
    /// enough to run on every hop.
    pub fn check_structure(&self) -> Result<(), DefinitionError> {
        let workflow = self.workflow.to_string();
        if self.steps.is_empty() {
            return Err(DefinitionError::NoSteps { workflow });
        }
        if self.steps.len() > MAX_STEPS {
            return Err(DefinitionError::TooManySteps {
                workflow,
                count: self.steps.len(),
            });
        }
        if self.version == 0 {
            return Err(DefinitionError::BadVersion { workflow });
        }
        for step in &self.steps {
            let bad = |problem: String| DefinitionError::BadStep {
                workflow: workflow.clone(),
                step: step.name.to_string(),
                problem,
            };
            if let Some(p) = step.retry.problem() {
                return Err(bad(p));
            }
            if step.timeout_ms == 0 {
                return Err(bad("timeout must be greater than zero".into()));
            }
            if step.max_visits == Some(0) {
                return Err(bad("max_visits must be at least 1".into()));
            }
            for b in &step.branches {
                if let Next::Goto(i) = b.next {
                    if usize::from(i) >= self.steps.len() {
                        return Err(bad(format!(
                            "outcome `{}` points at step index {i}, past the end",
                            b.outcome
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Everything `check_structure` does, plus the graph checks: unique
    /// names, every step reachable, every loop bounded.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        self.check_structure()?;
        let workflow = self.workflow.to_string();
        let mut names = HashSet::new();
        for step in &self.steps {
            if !names.insert(&step.name) {
                return Err(DefinitionError::DuplicateStep {
                    workflow,
                    step: step.name.to_string(),
                });
            }
            let mut outcomes = HashSet::new();
            for b in &step.branches {
                if !outcomes.insert(&b.outcome) {
                    return Err(DefinitionError::DuplicateOutcome {
                        workflow,
                        step: step.name.to_string(),
                        outcome: b.outcome.to_string(),
                    });
                }
            }
        }
        let edges: Vec<Vec<usize>> = (0..self.steps.len()).map(|i| self.successors(i)).collect();

        // Reachability from the first step.
        let mut seen = vec![false; self.steps.len()];
        let mut stack = vec![0usize];
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            stack.extend(edges[i].iter().copied().filter(|&j| !seen[j]));
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(DefinitionError::Unreachable {
                workflow,
                step: self.steps[i].name.to_string(),
            });
        }

        // Every cycle must pass through a step with a visit bound: with the
        // bounded steps taken out, the rest of the graph must be acyclic.
        let bounded: Vec<bool> = self.steps.iter().map(|s| s.max_visits.is_some()).collect();
        if let Some(cycle) = find_cycle(&edges, &bounded) {
            return Err(DefinitionError::UnboundedLoop {
                workflow,
                cycle: cycle.into_iter().map(|i| self.steps[i].name.to_string()).collect(),
            });
        }
        Ok(())
    }

    /// The steps that can follow step `i`.
    fn successors(&self, i: usize) -> Vec<usize> {
        let step = &self.steps[i];
        let mut out = Vec::new();
        let ok_mapped = step.branches.iter().any(|b| b.outcome.is_ok());
        let mut push = |next: Next| match next {
            Next::Continue if i + 1 < self.steps.len() => out.push(i + 1),
            Next::Goto(j) => out.push(usize::from(j)),
            _ => {}
        };
        if !ok_mapped {
            push(Next::Continue);
        }
        for b in &step.branches {
            push(b.next);
        }
        out
    }
}

/// Depth-first search for a cycle among the steps not marked `skip`.
fn find_cycle(edges: &[Vec<usize>], skip: &[bool]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::New; edges.len()];
    for start in 0..edges.len() {
        if skip[start] || mark[start] != Mark::New {
            continue;
        }
        // (node, next edge to look at)
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = Mark::OnPath;
        while let Some(&mut (node, ref mut edge)) = path.last_mut() {
            if let Some(&next) = edges[node].get(*edge) {
                *edge += 1;
                if skip[next] {
                    continue;
                }
                match mark[next] {
                    Mark::OnPath => {
                        let from = path.iter().position(|&(n, _)| n == next).unwrap_or(0);
                        return Some(path[from..].iter().map(|&(n, _)| n).collect());
                    }
                    Mark::New => {
                        mark[next] = Mark::OnPath;
                        path.push((next, 0));
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                path.pop();
            }
        }
    }
    None
}

/// A validated workflow definition. Cheap to clone.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    route: Arc<Route>,
}

impl Workflow {
    /// Starts a definition of workflow `name`, version `version` (≥ 1).
    pub fn builder(name: impl Into<String>, version: u32) -> WorkflowBuilder {
        WorkflowBuilder {
            name: name.into(),
            version,
            steps: Vec::new(),
        }
    }

    /// Wraps a route after validating it in full.
    pub fn from_route(route: Route) -> Result<Self, DefinitionError> {
        route.validate()?;
        Ok(Self { route: Arc::new(route) })
    }

    pub fn name(&self) -> &WorkflowName {
        &self.route.workflow
    }

    pub fn version(&self) -> u32 {
        self.route.version
    }

    pub fn route(&self) -> &Route {
        &self.route
    }

    /// The shared route, as documents carry it.
    pub fn shared_route(&self) -> Arc<Route> {
        self.route.clone()
    }

    /// Every service subject the route can send a document to (steps and
    /// compensations), without repeats.
    pub fn services(&self) -> Vec<ServiceSubject> {
        let mut out: Vec<ServiceSubject> = Vec::new();
        for s in &self.route.steps {
            for subj in std::iter::once(&s.service).chain(s.compensate.as_ref()) {
                if !out.contains(subj) {
                    out.push(subj.clone());
                }
            }
        }
        out
    }
}

struct StepDraft {
    name: String,
    service: String,
    compensate: Option<String>,
    retry: Backoff,
    timeout: Duration,
    branches: Vec<(String, Then)>,
    max_visits: Option<u32>,
}

/// Builds a [`Workflow`]. Methods after `step(…)` configure that step.
/// Nothing is checked until [`build`](Self::build), which checks everything.
#[must_use]
pub struct WorkflowBuilder {
    name: String,
    version: u32,
    steps: Vec<StepDraft>,
}

impl std::fmt::Debug for WorkflowBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowBuilder")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &self.steps.len())
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
        let mut steps = Vec::with_capacity(self.steps.len());
        for draft in &self.steps {
            let mut branches = Vec::with_capacity(draft.branches.len());
            for (outcome, then) in &draft.branches {
                let next = match then {
                    Then::Continue => Next::Continue,
                    Then::Fail => Next::Fail,
                    Then::Complete => Next::Complete,
                    Then::Step(to) => match index_of(to) {
                        // Below MAX_STEPS, so the index fits.
                        Some(i) => Next::Goto(u16::try_from(i).unwrap_or(u16::MAX)),
                        None => {
                            return Err(DefinitionError::UnknownStep {
                                workflow,
                                from: draft.name.clone(),
                                outcome: outcome.clone(),
                                to: to.clone(),
                            })
                        }
                    },
                };
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
            });
        }
        Workflow::from_route(Route {
            workflow: name,
            version: self.version,
            steps,
        })
    }
}

#[cfg(test)]
mod tests {
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
}
