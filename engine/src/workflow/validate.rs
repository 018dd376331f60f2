//! What a route must be: the structural checks every decoded route passes,
//! and the graph checks of a definition at build.

use std::collections::HashSet;

use super::{DefinitionError, Next, Onward, Route, MAX_STEPS};

impl Route {
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
            if let Some(crate::workflow::Wait::Until { field }) = &step.wait {
                if field.is_empty() || field.split('.').any(str::is_empty) {
                    return Err(bad(format!("`{field}` is not a payload field to wait until")));
                }
                if std::ptr::eq(step, &self.steps[0]) {
                    return Err(bad(
                        "the first step cannot wait until a payload time (no worker reads the payload before \
                         it); wait on a later step, or start the order at its time"
                            .into(),
                    ));
                }
            }
            if let Some(d) = step.wait.as_ref().and_then(crate::workflow::Wait::duration) {
                let what = if step.awaits().is_some() {
                    "a signal's deadline"
                } else {
                    "a delay"
                };
                if d.is_zero() {
                    return Err(bad(format!("{what} must be longer than zero")));
                }
                if d > super::MAX_DELAY {
                    return Err(bad(format!(
                        "{what} of {} s is longer than the most a route may hold ({} s, a year)",
                        d.as_secs(),
                        super::MAX_DELAY.as_secs()
                    )));
                }
            }
            if let Some(crate::workflow::Wait::Signal {
                on_timeout: Next::Goto(i),
                ..
            }) = step.wait
            {
                if usize::from(i) >= self.steps.len() {
                    return Err(bad(format!(
                        "its signal's timeout points at step index {i}, past the end"
                    )));
                }
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
        self.check_forks()
    }

    /// The forks' layout: each one's branches are steps of the route, in
    /// order, two at least, none empty, after the first step, and no two
    /// forks share a step.
    fn check_forks(&self) -> Result<(), DefinitionError> {
        let mut after = 1u16;
        for fork in &self.forks {
            let bad = |problem: &str| DefinitionError::BadFork {
                workflow: self.workflow.to_string(),
                problem: format!("fork `{}` {problem}", fork.name),
            };
            if fork.starts.len() < 2 || fork.starts.len() > super::MAX_BRANCHES {
                return Err(bad(&format!(
                    "has {} branches; a fork runs from 2 to {}",
                    fork.starts.len(),
                    super::MAX_BRANCHES
                )));
            }
            if fork.starts[0] < after {
                return Err(bad("starts before the step that enters it, or inside another fork"));
            }
            if fork.starts.iter().chain([&fork.end]).collect::<Vec<_>>().windows(2).any(|w| w[0] >= w[1]) {
                return Err(bad("has a branch with no steps"));
            }
            if usize::from(fork.end) > self.steps.len() {
                return Err(bad("ends past the last step"));
            }
            if fork.join.first.is_some_and(|n| n == 0 || usize::from(n) > fork.starts.len()) {
                return Err(bad("joins more branches than it has, or none"));
            }
            after = fork.end;
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
        self.check_branch_edges()?;
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
        // A fork is entered once per order: its join's state is kept by
        // the order and the fork.
        for fork in &self.forks {
            let mut seen = vec![false; self.steps.len()];
            let mut stack: Vec<usize> = Some(usize::from(fork.end)).filter(|&e| e < self.steps.len()).into_iter().collect();
            while let Some(i) = stack.pop() {
                if std::mem::replace(&mut seen[i], true) {
                    continue;
                }
                if fork.branch_of(u16::try_from(i).unwrap_or(u16::MAX)).is_some() {
                    return Err(DefinitionError::BadFork {
                        workflow,
                        problem: format!(
                            "a loop across the join of fork `{}`: `{}` leads back into the fork",
                            fork.name, self.steps[i].name
                        ),
                    });
                }
                stack.extend(edges[i].iter().copied().filter(|&j| !seen[j]));
            }
        }
        Ok(())
    }

    /// Every way on of every step, as written (the outcomes mapped, the
    /// way on of `ok` when it is not, a signal's timeout).
    fn ways_on(step: &super::RouteStep) -> impl Iterator<Item = Next> + '_ {
        let ok_mapped = step.branches.iter().any(|b| b.outcome.is_ok());
        (!ok_mapped)
            .then_some(Next::Continue)
            .into_iter()
            .chain(step.branches.iter().map(|b| b.next))
            .chain(match step.wait {
                // A signal that does not come leads from the step, unrun.
                Some(crate::workflow::Wait::Signal { on_timeout, .. }) => Some(on_timeout),
                _ => None,
            })
    }

    /// A branch's steps lead only within it (or on to its join), and only
    /// the fork's entry leads into it from outside.
    fn check_branch_edges(&self) -> Result<(), DefinitionError> {
        for (i, step) in self.steps.iter().enumerate() {
            let at = u16::try_from(i).unwrap_or(u16::MAX);
            let inside = self.branch_of(at);
            for next in Self::ways_on(step) {
                let Next::Goto(j) = next else { continue };
                let into = self.branch_of(j);
                let fork_entry = inside.is_none() && self.fork_at(j).is_some();
                let problem = match (inside, into) {
                    (Some(a), b) if Some(a) != b => format!("leads out of its branch to `{}`", self.steps[usize::from(j)].name),
                    (_, Some((f, b))) if inside != into && !fork_entry => format!(
                        "leads into branch {} of fork `{}` from outside it",
                        b + 1,
                        self.forks[f].name
                    ),
                    _ => continue,
                };
                return Err(DefinitionError::BadFork {
                    workflow: self.workflow.to_string(),
                    problem: format!("step `{}` {problem}", step.name),
                });
            }
        }
        Ok(())
    }

    /// The steps that can follow step `i`: a fork's entry leads to the
    /// first step of each of its branches, a branch's end to its join's.
    fn successors(&self, i: usize) -> Vec<usize> {
        let at = u16::try_from(i).unwrap_or(u16::MAX);
        let mut out = Vec::new();
        for next in Self::ways_on(&self.steps[i]) {
            match self.onward(at, next) {
                Onward::Step(j) => out.push(usize::from(j)),
                Onward::Fork(f) => out.extend(self.forks[f].starts.iter().map(|&s| usize::from(s))),
                Onward::Join(f) => {
                    let end = self.forks[f].end;
                    match self.fork_at(end) {
                        // A join that leads straight into another fork.
                        Some(g) => out.extend(self.forks[g].starts.iter().map(|&s| usize::from(s))),
                        None if usize::from(end) < self.steps.len() => out.push(usize::from(end)),
                        None => {}
                    }
                }
                Onward::Complete | Onward::Fail => {}
            }
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
