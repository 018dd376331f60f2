//! Workflow definitions: the builder users write, and the [`Route`] that is
//! copied into every document at start.
//!
//! A route is a list of steps. After a step, its *outcome* picks what comes
//! next: `ok` goes on to the following step unless the route says otherwise,
//! other outcomes go where `on(outcome, …)` sends them, and an outcome the
//! route does not name fails the order. `build()` refuses a route that could
//! surprise at run time: duplicate or unknown step names, unreachable steps,
//! loops without a bound.

mod backoff;
mod builder;
mod fork;
pub mod graph;
#[cfg(test)]
mod tests;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use crate::id::{NameError, Outcome, ServiceSubject, SignalName, StepName, WorkflowName};

pub use backoff::Backoff;
pub use builder::{WorkflowBuilder, DEFAULT_STEP_TIMEOUT};
pub use fork::{Fork, Join, Merge, Onward, MAX_BRANCHES};

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
    /// A fork, a branch or a join that does not make parallel branches:
    /// a join without a fork, a branch with no steps, a step leading into
    /// or out of a branch, a loop across a join.
    #[error("workflow `{workflow}`: {problem}")]
    BadFork { workflow: String, problem: String },
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
    /// What the order waits for each time it enters the step, before the
    /// step runs.
    pub wait: Option<Wait>,
}

/// What an order waits for before a step runs. It holds no worker while
/// it waits: the hop is stored with the time it is due (over NATS, as a
/// message the server schedules), and a worker sees it when it is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// This long after the step before it ended (after the start, for the
    /// first step), in milliseconds.
    Delay { ms: u64 },
    /// Until the time a field of the payload holds (its JSON form: a
    /// top-level name, or a dotted path into nested objects), an RFC 3339
    /// time or milliseconds since the epoch; read as the step is entered.
    /// A time past is no wait.
    Until { field: compact_str::CompactString },
    /// Until the named signal is delivered to the order (`waybill signal`),
    /// or `timeout_ms` after the step before it ended, when the route goes
    /// `on_timeout` instead (the step does not run). A signal delivered
    /// before the order reaches the step is kept for it.
    Signal {
        name: SignalName,
        timeout_ms: u64,
        on_timeout: Next,
    },
}

/// The longest [`Wait::Delay`] a route may hold: a year.
pub const MAX_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);

impl Wait {
    pub fn delay(d: Duration) -> Self {
        Self::Delay {
            ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// How long after the step before it the step is due (for a signal,
    /// its deadline: the hop comes then unless the signal wakes it before);
    /// `None` for a time read from the payload.
    pub fn duration(&self) -> Option<Duration> {
        match self {
            Self::Delay { ms } | Self::Signal { timeout_ms: ms, .. } => Some(Duration::from_millis(*ms)),
            Self::Until { .. } => None,
        }
    }

    /// The signal waited for, if this is a wait for one.
    pub fn signal(&self) -> Option<&SignalName> {
        match self {
            Self::Signal { name, .. } => Some(name),
            _ => None,
        }
    }
}

impl RouteStep {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.timeout_ms))
    }

    /// The signal the step waits for before it runs, if it does.
    pub fn awaits(&self) -> Option<&SignalName> {
        self.wait.as_ref().and_then(Wait::signal)
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
    /// Where the route runs branches in parallel (none for most routes).
    pub forks: Vec<Fork>,
}

impl Route {
    pub fn step(&self, index: u16) -> Option<&RouteStep> {
        self.steps.get(usize::from(index))
    }

    pub fn step_by_name(&self, name: &StepName) -> Option<&RouteStep> {
        self.steps.iter().find(|s| &s.name == name)
    }
}

/// A validated workflow definition. Cheap to clone.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    route: Arc<Route>,
}

impl Workflow {
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

fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}
