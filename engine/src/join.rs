//! Joins: what happens when a branch's document arrives at its fork's join.
//!
//! The join's state is kept by the transport, one record per order and
//! fork ([`crate::Transport::join_state`]), written with compare-and-set:
//! the order's document as it forked (the base), then each branch's
//! document as it arrived, in the order they arrived. Everything here is a
//! pure function of that record: a worker that dies after writing it and
//! before publishing what follows does the same again on the redelivery,
//! and publishes the same hops under the same deduplication ids.
//!
//! The verdict, read off the arrivals in order:
//! - **Go on** once as many branches have completed as the join waits for
//!   (all of them, or the first n). The arrival that made it so publishes
//!   the order's document past the join: the base, with the completed
//!   branches' history and owed compensations, and their payloads merged
//!   as the route says. Branches that failed before it undo their own
//!   steps; those that arrive after it (or are stopped at their next hop)
//!   undo theirs.
//! - **Fail** once that can no longer happen (a branch failed, was
//!   cancelled or stopped, and too few are left). The branches still
//!   running stop at their next hop; the last to arrive publishes the
//!   order's compensation: every branch's completed steps and the steps
//!   before the fork, newest first (a cancel ends it `cancelled`).

use bytes::Bytes;

use crate::codec::{Codec, DecodeError, EncodeError, Format};
use crate::document::{BranchAt, Document, Payload, Status, Timestamp};
use crate::transition::{self, Decision};
use crate::workflow::{Fork, Merge};

/// A join's record: the order's document as it forked, and the branches'
/// documents as they arrived, each without what the base holds (its
/// history and compensations owed from before the fork).
#[derive(Debug, Clone, PartialEq)]
pub struct JoinState {
    pub base: Document,
    pub arrivals: Vec<Document>,
}

/// Why a join's record cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the join's record is malformed: {0}")]
    Malformed(String),
    #[error("a document in the join's record: {0}")]
    Decode(#[from] DecodeError),
    #[error("the join's record cannot be written: {0}")]
    Encode(#[from] EncodeError),
}

/// What a join's arrivals add up to so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not decided yet.
    Open,
    /// Enough branches completed; the arrival at this index decided it.
    GoOn { by: usize },
    /// Too few can complete now; the arrival at this index decided it.
    Fail { by: usize },
}

/// The verdict of `fork`'s join after `arrivals`.
pub fn verdict(fork: &Fork, arrivals: &[Document]) -> Verdict {
    let (branches, needed) = (fork.starts.len(), fork.needed());
    let (mut completed, mut failed) = (0, 0);
    for (i, a) in arrivals.iter().enumerate() {
        if a.status == Status::Completed {
            completed += 1;
        } else {
            failed += 1;
        }
        if completed >= needed {
            return Verdict::GoOn { by: i };
        }
        if branches.saturating_sub(failed) < needed {
            return Verdict::Fail { by: i };
        }
    }
    Verdict::Open
}

/// Why a branch still running stops at this hop, if it does: its join was
/// decided without it.
pub fn stop_reason(fork: &Fork, state: &JoinState, branch: u8) -> Option<String> {
    if state.arrivals.iter().any(|a| branch_of(a) == Some(branch)) {
        // A delivery from before its arrival, come again: its arrival
        // (a duplicate of the hop it made then) changes nothing.
        return Some(format!("stopped: the branch arrived at the join of fork `{}` already", fork.name));
    }
    match verdict(fork, &state.arrivals) {
        Verdict::Open => None,
        Verdict::GoOn { .. } => Some(format!(
            "stopped: fork `{}` went on with the first {} branches",
            fork.name,
            fork.needed()
        )),
        Verdict::Fail { by } => Some(format!(
            "stopped: branch {} of fork `{}` did not complete",
            branch_of(&state.arrivals[by]).map_or(0, |b| u32::from(b) + 1),
            fork.name
        )),
    }
}

fn branch_of(doc: &Document) -> Option<u8> {
    doc.branch.map(|b| b.branch)
}

/// Adds `doc` (a branch's document that arrived) to the record, unless its
/// branch arrived already (a redelivery): `false` then.
pub fn record(state: &mut JoinState, doc: &Document) -> bool {
    if state.arrivals.iter().any(|a| branch_of(a) == branch_of(doc)) {
        return false;
    }
    // Kept without what the base holds already (the history and the
    // compensations from before the fork), so the record grows by what
    // each branch did, not by the document each time.
    let mut arrived = doc.clone();
    if let Some(at) = &mut arrived.branch {
        let (history, owed) = (
            usize::try_from(at.history_at).unwrap_or(usize::MAX),
            usize::try_from(at.owed_at).unwrap_or(usize::MAX),
        );
        arrived.history.drain(..history.min(arrived.history.len()));
        arrived.owed.drain(..owed.min(arrived.owed.len()));
        at.history_at = 0;
        at.owed_at = 0;
    }
    state.arrivals.push(arrived);
    true
}

/// Reads a payload as JSON and writes JSON back as a payload of the same
/// workflow, for [`Merge::Fields`] when more than one branch changed it.
pub trait PayloadJson {
    fn to_json(&self, doc: &Document, payload: &Payload) -> Result<serde_json::Value, String>;
    fn to_payload(&self, doc: &Document, json: &serde_json::Value) -> Result<Payload, String>;
}

/// What follows the arrival of `branch`'s document at the join, by the
/// record (which holds it): the documents to publish, each with where it
/// goes. Empty while the join waits for other branches.
pub fn follow(state: &JoinState, fork_index: usize, branch: u8, json: &dyn PayloadJson) -> Vec<(Document, Decision)> {
    let Some(fork) = state.base.route.forks.get(fork_index) else {
        return Vec::new();
    };
    let Some(me) = state.arrivals.iter().position(|a| branch_of(a) == Some(branch)) else {
        return Vec::new();
    };
    match verdict(fork, &state.arrivals) {
        Verdict::Open => Vec::new(),
        Verdict::GoOn { by } if me == by => {
            let mut out = vec![go_on(state, fork, by, json)];
            // Those that failed before it undo what they did (those that
            // completed before it are joined).
            out.extend(
                state.arrivals[..by]
                    .iter()
                    .filter(|a| a.status != Status::Completed)
                    .filter_map(undo_branch),
            );
            out
        }
        Verdict::GoOn { by } if me > by => undo_branch(&state.arrivals[me]).into_iter().collect(),
        Verdict::GoOn { .. } => Vec::new(),
        Verdict::Fail { by } => {
            if state.arrivals.len() == fork.starts.len() && me + 1 == state.arrivals.len() {
                vec![fail(state, by)]
            } else {
                Vec::new()
            }
        }
    }
}

/// The compensations a branch's document owes for its own steps, each with
/// when the step they undo ended.
fn owed_by(doc: &Document) -> Vec<(Timestamp, crate::document::Compensation)> {
    let Some(at) = doc.branch else {
        return Vec::new();
    };
    let from = usize::try_from(at.owed_at).unwrap_or(usize::MAX);
    doc.owed
        .get(from..)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let ended = doc
                .history
                .iter()
                .rev()
                .find(|r| r.step == c.step && r.kind == crate::document::StepKind::Forward)
                .map_or(Timestamp(0), |r| r.ended_at);
            (ended, c.clone())
        })
        .collect()
}

/// A branch's own records, after the fork.
fn records_of(doc: &Document) -> &[crate::document::StepRecord] {
    let from = doc.branch.map_or(0, |b| usize::try_from(b.history_at).unwrap_or(usize::MAX));
    doc.history.get(from..).unwrap_or_default()
}

/// The order's document with what `joined` did: their records (in the
/// order they started) and their compensations owed (newest last, so that
/// they are undone first), at a hop past every one of theirs.
fn merged(state: &JoinState, joined: &[&Document], hop_from: &[Document]) -> Document {
    let mut doc = state.base.clone();
    doc.branch = None;
    let mut records: Vec<_> = joined.iter().flat_map(|d| records_of(d).iter().cloned()).collect();
    records.sort_by_key(|r| r.started_at);
    doc.history.extend(records);
    let mut owed: Vec<_> = joined.iter().flat_map(|d| owed_by(d)).collect();
    owed.sort_by_key(|(ended, _)| *ended);
    doc.owed.extend(owed.into_iter().map(|(_, c)| c));
    doc.hop = hop_from.iter().map(|d| d.hop).max().unwrap_or(doc.hop).max(doc.hop.saturating_add(1));
    doc.status = Status::Running;
    doc.attempt = 1;
    doc.not_before = None;
    doc
}

/// The order's document past the join: the completed branches among the
/// arrivals up to `by`, merged.
fn go_on(state: &JoinState, fork: &Fork, by: usize, json: &dyn PayloadJson) -> (Document, Decision) {
    let upto = &state.arrivals[..=by];
    let joined: Vec<&Document> = upto.iter().filter(|a| a.status == Status::Completed).collect();
    let mut doc = merged(state, &joined, upto);
    let at = upto[by].history.last().map_or(state.base.created_at, |r| r.ended_at);
    match merge_payloads(&state.base, &joined, fork, json) {
        Ok(payload) => doc.payload = payload,
        Err(why) => {
            let why = format!("the join of fork `{}` cannot merge its branches' payloads: {why}", fork.name);
            let decision = transition::fail(&mut doc, why);
            return (doc, decision);
        }
    }
    let decision = match doc.route.fork_at(fork.end) {
        // The join leads straight into another fork.
        Some(next) => transition::enter_fork(&mut doc, next),
        None => transition::enter(&mut doc, usize::from(fork.end), at),
    };
    (doc, decision)
}

/// The order's compensation once every branch arrived, the join having
/// failed at arrival `by`: every branch's steps and those before the fork
/// undone, newest first.
fn fail(state: &JoinState, by: usize) -> (Document, Decision) {
    let all: Vec<&Document> = state.arrivals.iter().collect();
    let mut doc = merged(state, &all, &state.arrivals);
    let why = state.arrivals[by]
        .failure
        .clone()
        .unwrap_or_else(|| "a branch did not complete".to_owned());
    if doc.owed.is_empty() && transition::was_cancelled(&doc) {
        doc.failure = Some(why);
        doc.status = Status::Cancelled;
        return (doc, Decision::Finish(Status::Cancelled));
    }
    let decision = transition::fail(&mut doc, why);
    (doc, decision)
}

/// A branch's document that arrived without being joined, set to undo its
/// own steps (none if it owes nothing).
fn undo_branch(doc: &Document) -> Option<(Document, Decision)> {
    let owed: Vec<_> = owed_by(doc).into_iter().map(|(_, c)| c).collect();
    let service = owed.last()?.service.clone();
    let mut d = doc.clone();
    // A hop past its arrival's (which was stored under its own).
    d.hop = d.hop.saturating_add(1);
    d.owed = owed;
    // It owes nothing from before the fork now.
    if let Some(b) = &mut d.branch {
        b.owed_at = 0;
    }
    if d.failure.is_none() {
        d.failure = Some("not joined: its fork went on without it".to_owned());
    }
    d.status = Status::Compensating;
    d.attempt = 1;
    d.not_before = None;
    Some((d, Decision::Hop { service, delay: None }))
}

/// The payload past the join, by the fork's merge rule.
fn merge_payloads(base: &Document, joined: &[&Document], fork: &Fork, json: &dyn PayloadJson) -> Result<Payload, String> {
    if fork.join.merge == Merge::Keep {
        return Ok(base.payload.clone());
    }
    let changed: Vec<&&Document> = joined.iter().filter(|d| d.payload != base.payload).collect();
    match changed.as_slice() {
        [] => return Ok(base.payload.clone()),
        [one] => return Ok(one.payload.clone()),
        _ => {}
    }
    let before = json.to_json(base, &base.payload)?;
    let serde_json::Value::Object(mut out) = before.clone() else {
        return Err("the payload is not a JSON object, and more than one branch changed it".into());
    };
    let mut set_by: std::collections::HashMap<String, u8> = std::collections::HashMap::new();
    for d in changed {
        let branch = branch_of(d).unwrap_or(0);
        let serde_json::Value::Object(fields) = json.to_json(d, &d.payload)? else {
            return Err(format!("branch {} left a payload that is not a JSON object", u32::from(branch) + 1));
        };
        for (name, value) in fields {
            if before.get(&name) == Some(&value) {
                continue;
            }
            if let Some(other) = set_by.insert(name.clone(), branch) {
                if out.get(&name) != Some(&value) {
                    return Err(format!(
                        "branches {} and {} both changed `{name}`",
                        u32::from(other) + 1,
                        u32::from(branch) + 1
                    ));
                }
            }
            out.insert(name, value);
        }
    }
    json.to_payload(base, &serde_json::Value::Object(out))
}

/// Whether `doc` is the order's own document at a fork's entry (see
/// [`transition::enter_fork`]): the fork to make.
pub fn forking(doc: &Document) -> Option<usize> {
    if doc.branch.is_some() || doc.status != Status::Running {
        return None;
    }
    doc.route.fork_at(doc.step)
}

/// Whether `doc` is a branch's document arriving at its join.
pub fn arriving(doc: &Document) -> bool {
    doc.branch.is_some() && matches!(doc.status, Status::Completed | Status::Failed | Status::Cancelled)
}

/// Makes the documents of a fork's branches from the order's document at
/// the fork's entry: each one's first step entered at `at`, a hop past the
/// entry's.
pub fn branches(doc: &Document, fork_index: usize, at: Timestamp) -> Vec<(Document, Decision)> {
    let Some(fork) = doc.route.forks.get(fork_index) else {
        return Vec::new();
    };
    let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    (0..fork.starts.len())
        .map(|b| {
            let mut d = doc.clone();
            d.hop = doc.hop.saturating_add(1);
            d.branch = Some(BranchAt {
                fork: u8::try_from(fork_index).unwrap_or(u8::MAX),
                branch: u8::try_from(b).unwrap_or(u8::MAX),
                hop_at: d.hop,
                history_at: len32(doc.history.len()),
                owed_at: len32(doc.owed.len()),
            });
            let decision = transition::enter(&mut d, usize::from(fork.starts[b]), at);
            (d, decision)
        })
        .collect()
}

/// A branch's document at a hop where its join was decided without it:
/// it arrives stopped (failed, with `why`), owing what it owes.
pub fn stop(doc: &mut Document, why: String) {
    doc.hop = doc.hop.saturating_add(1);
    doc.failure = Some(why);
    doc.status = Status::Failed;
    doc.attempt = 1;
    doc.not_before = None;
}

/// The record's bytes: each document in the binary form, after its length.
pub fn encode(codec: &Codec, state: &JoinState) -> Result<Bytes, JoinError> {
    let mut out = Vec::new();
    for doc in std::iter::once(&state.base).chain(&state.arrivals) {
        let bytes = codec.encode(doc, Format::Postcard)?;
        out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(Bytes::from(out))
}

/// Reads a record [`encode`] wrote.
pub fn decode(codec: &Codec, mut bytes: &[u8]) -> Result<JoinState, JoinError> {
    let mut docs = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| JoinError::Malformed("a document's length is cut short".into()))?;
        let len = usize::try_from(u32::from_be_bytes(*len)).unwrap_or(usize::MAX);
        if len > rest.len() {
            return Err(JoinError::Malformed("a document is cut short".into()));
        }
        let (doc, rest) = rest.split_at(len);
        docs.push(codec.decode(doc, Format::Postcard)?);
        bytes = rest;
    }
    let mut docs = docs.into_iter();
    let base = docs
        .next()
        .ok_or_else(|| JoinError::Malformed("it holds no document".into()))?;
    Ok(JoinState {
        base,
        arrivals: docs.collect(),
    })
}
