//! Parallel branches and their join.
//!
//! A fork's branches are steps of the route like any other, laid out one
//! branch after another: `.fork("holds")`, then `.branch()` before each
//! branch's steps, then `.join(Join::all())`. The step before the fork
//! enters it (its way on is every branch at once, each with its own copy of
//! the document); a branch's steps lead only within it; a branch is done
//! when its way on leaves it (the step after its last, or `complete`), and
//! the join goes on to the step after the last branch once the branches it
//! waits for are done.

use std::ops::Range;

use super::{Next, Route};
use crate::id::StepName;

/// Most branches a fork may have.
pub const MAX_BRANCHES: usize = 16;

/// A fork of a route: its branches (by the index of each one's first step)
/// and how they join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fork {
    /// Named like a step: in the history, the graph and the status.
    pub name: StepName,
    /// The first step of each branch, in order; a branch runs up to the
    /// next one's first step, the last up to `end`.
    pub starts: Vec<u16>,
    /// The step after the last branch: where the join goes on (the end of
    /// the route when it is past the last step).
    pub end: u16,
    pub join: Join,
}

/// When a join goes on, and how it merges what its branches did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Join {
    /// How many branches must complete; `None`: all of them.
    pub first: Option<u8>,
    pub merge: Merge,
}

/// How the branches' payloads come back into one document at the join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Merge {
    /// Each payload field a joined branch changed is taken from that
    /// branch (a payload changed by one branch only is taken whole,
    /// whatever its encoding); two branches changing the same field fail
    /// the order. A JSON payload, or a binary one the joining worker's
    /// registry reads.
    #[default]
    Fields,
    /// The payload as it was at the fork; what the branches did stays in
    /// the history (their details).
    Keep,
}

impl Join {
    /// Goes on when every branch has completed.
    pub fn all() -> Self {
        Self {
            first: None,
            merge: Merge::Fields,
        }
    }

    /// Goes on when the first `n` branches have completed; the others are
    /// stopped at their next hop and undo what they did.
    pub fn first(n: u8) -> Self {
        Self {
            first: Some(n),
            merge: Merge::Fields,
        }
    }

    /// How the joined branches' payloads are merged (by default
    /// [`Merge::Fields`]).
    pub fn merge(self, merge: Merge) -> Self {
        Self { merge, ..self }
    }
}

impl Fork {
    /// The steps of branch `b`.
    pub fn span(&self, b: usize) -> Range<u16> {
        let start = self.starts.get(b).copied().unwrap_or(self.end);
        let end = self.starts.get(b + 1).copied().unwrap_or(self.end);
        start..end
    }

    /// How many branches must complete for the join to go on.
    pub fn needed(&self) -> usize {
        self.join.first.map_or(self.starts.len(), usize::from)
    }

    /// The branch step `i` belongs to, if it is one of this fork's.
    pub fn branch_of(&self, i: u16) -> Option<usize> {
        (0..self.starts.len()).find(|&b| self.span(b).contains(&i))
    }
}

/// Where going on from a step leads, forks and joins counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Onward {
    /// Another step.
    Step(u16),
    /// Every branch of this fork at once.
    Fork(usize),
    /// The branch is done: to its fork's join.
    Join(usize),
    /// The order is complete.
    Complete,
    /// The order fails.
    Fail,
}

impl Route {
    /// The fork whose first branch starts at step `i`.
    pub fn fork_at(&self, i: u16) -> Option<usize> {
        self.forks.iter().position(|f| f.starts.first() == Some(&i))
    }

    /// The fork and branch step `i` belongs to.
    pub fn branch_of(&self, i: u16) -> Option<(usize, usize)> {
        self.forks
            .iter()
            .enumerate()
            .find_map(|(f, fork)| fork.branch_of(i).map(|b| (f, b)))
    }

    /// Where `next` leads from step `i`: a step of the same branch (or of
    /// the main line), every branch of a fork (from the step before it),
    /// the join (from a branch, when its way on leaves it), completion or
    /// failure.
    pub fn onward(&self, i: u16, next: Next) -> Onward {
        let inside = self.branch_of(i);
        let target = match next {
            Next::Fail => return Onward::Fail,
            Next::Complete => None,
            Next::Goto(j) => Some(j),
            Next::Continue => match inside {
                // The last step of a branch continues to the join.
                Some((f, b)) if self.forks[f].span(b).end == i + 1 => None,
                _ => Some(i + 1).filter(|&j| usize::from(j) < self.steps.len()),
            },
        };
        match (target, inside) {
            (None, Some((f, _))) => Onward::Join(f),
            (None, None) => Onward::Complete,
            (Some(j), Some((f, b))) if !self.forks[f].span(b).contains(&j) => Onward::Join(f),
            (Some(j), _) => match self.fork_at(j) {
                Some(f) if inside.is_none() => Onward::Fork(f),
                _ => Onward::Step(j),
            },
        }
    }
}
