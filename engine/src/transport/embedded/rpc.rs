//! Requests, answers and announcements between the tasks of one process:
//! the [`Rpc`] seam of the embedded transport.
//!
//! A subscription is a pattern, a group and a channel. A request goes to one
//! live subscription of each group with a matching pattern (in turn inside a
//! group); the first answer wins. Subscriptions whose receiver was dropped
//! are removed the next time a message is routed.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{lock, Embedded};
use crate::transport::{Error, Headers, Request, Requests, Rpc};

/// The subscriptions of one embedded transport.
#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    state: std::sync::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    subs: Vec<Subscription>,
    /// Per group, how many messages it was given: picks the next member.
    turns: HashMap<String, usize>,
}

#[derive(Debug)]
struct Subscription {
    pattern: Vec<String>,
    group: String,
    tx: mpsc::UnboundedSender<EmbeddedRequest>,
}

/// Checks a subject (`wildcards` false) or a pattern: dot-separated
/// non-empty tokens without whitespace; in a pattern, `*` is any one token
/// and a last `>` one or more.
fn tokens(subject: &str, wildcards: bool) -> Result<Vec<&str>, Error> {
    let bad = |why: &str| Error::BadConfig(format!("invalid subject `{subject}`: {why}"));
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(bad("empty token"));
        }
        if t.chars().any(char::is_whitespace) {
            return Err(bad("whitespace"));
        }
        if (*t == "*" || *t == ">") && !wildcards {
            return Err(bad("wildcards only subscribe"));
        }
        if *t == ">" && i + 1 != tokens.len() {
            return Err(bad("`>` must be the last token"));
        }
    }
    Ok(tokens)
}

fn matches(pattern: &[String], subject: &[&str]) -> bool {
    for (i, p) in pattern.iter().enumerate() {
        if p == ">" {
            return subject.len() > i;
        }
        match subject.get(i) {
            Some(s) if p == "*" || p == s => {}
            _ => return false,
        }
    }
    pattern.len() == subject.len()
}

impl Subscriptions {
    /// Gives `make()` to one live matching subscription per group; how many
    /// got it.
    fn route(&self, subject: &str, make: impl Fn() -> EmbeddedRequest) -> Result<usize, Error> {
        let tokens = tokens(subject, false)?;
        let mut state = lock(&self.state);
        state.subs.retain(|s| !s.tx.is_closed());
        let State { subs, turns } = &mut *state;
        // Per group, its matching subscriptions (one per channel).
        let mut groups: Vec<(&str, Vec<&mpsc::UnboundedSender<EmbeddedRequest>>)> = Vec::new();
        for s in subs.iter().filter(|s| matches(&s.pattern, &tokens)) {
            let members = match groups.iter_mut().find(|(g, _)| *g == s.group) {
                Some((_, m)) => m,
                None => {
                    groups.push((&s.group, Vec::new()));
                    match groups.last_mut() {
                        Some((_, m)) => m,
                        None => continue,
                    }
                }
            };
            if !members.iter().any(|m| m.same_channel(&s.tx)) {
                members.push(&s.tx);
            }
        }
        let mut delivered = 0;
        for (group, members) in groups {
            let turn = turns.entry(group.to_owned()).or_insert(0);
            // A receiver dropped since the check above refuses: try the next.
            for k in 0..members.len() {
                let member = members[(*turn + k) % members.len()];
                if member.send(make()).is_ok() {
                    *turn = turn.wrapping_add(k + 1);
                    delivered += 1;
                    break;
                }
            }
        }
        Ok(delivered)
    }
}

impl Rpc for Embedded {
    type Requests = EmbeddedRequests;

    async fn serve(&self, subjects: &[String], group: &str) -> Result<EmbeddedRequests, Error> {
        if subjects.is_empty() {
            return Err(Error::BadConfig("serve needs at least one subject".into()));
        }
        if group.is_empty() || group.chars().any(char::is_whitespace) {
            return Err(Error::BadConfig(format!("invalid group `{group}`")));
        }
        let patterns = subjects
            .iter()
            .map(|s| Ok(tokens(s, true)?.into_iter().map(str::to_owned).collect()))
            .collect::<Result<Vec<Vec<String>>, Error>>()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = lock(&self.inner.rpc.state);
        for pattern in patterns {
            state.subs.push(Subscription {
                pattern,
                group: group.to_owned(),
                tx: tx.clone(),
            });
        }
        Ok(EmbeddedRequests { rx })
    }

    async fn request(
        &self,
        subject: String,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        self.check_size(&payload)?;
        let (reply, mut answers) = mpsc::channel(1);
        let delivered = self.inner.rpc.route(&subject, || EmbeddedRequest {
            subject: subject.clone(),
            headers: headers.clone(),
            payload: payload.clone(),
            reply: Some(reply.clone()),
        })?;
        drop(reply);
        if delivered == 0 {
            return Err(Error::NoResponders(subject));
        }
        match tokio::time::timeout(timeout, answers.recv()).await {
            Ok(Some(answer)) => Ok(answer),
            // Every server dropped the request unanswered: none will come.
            Ok(None) => Err(Error::TimedOut(format!(
                "no answer on `{subject}`: the request was dropped"
            ))),
            Err(_) => Err(Error::TimedOut(format!("no answer on `{subject}` within {timeout:?}"))),
        }
    }

    async fn announce(&self, subject: String, payload: Bytes) -> Result<(), Error> {
        self.check_size(&payload)?;
        self.inner.rpc.route(&subject, || EmbeddedRequest {
            subject: subject.clone(),
            headers: Headers::new(),
            payload: payload.clone(),
            reply: None,
        })?;
        Ok(())
    }
}

impl Embedded {
    fn check_size(&self, payload: &Bytes) -> Result<(), Error> {
        let max = self.inner.config.max_message_size;
        if payload.len() > max {
            return Err(Error::TooLarge {
                size: payload.len(),
                max,
            });
        }
        Ok(())
    }
}

/// The requests sent to the subjects one [`Embedded::serve`] call serves.
#[derive(Debug)]
pub struct EmbeddedRequests {
    rx: mpsc::UnboundedReceiver<EmbeddedRequest>,
}

impl Requests for EmbeddedRequests {
    type Request = EmbeddedRequest;

    async fn next(&mut self) -> Option<EmbeddedRequest> {
        self.rx.recv().await
    }
}

/// One request (or announcement) inside the process.
#[derive(Debug)]
pub struct EmbeddedRequest {
    subject: String,
    headers: Headers,
    payload: Bytes,
    /// `None` for an announcement.
    reply: Option<mpsc::Sender<Bytes>>,
}

impl Request for EmbeddedRequest {
    fn subject(&self) -> &str {
        &self.subject
    }

    fn headers(&self) -> &Headers {
        &self.headers
    }

    fn payload(&self) -> &Bytes {
        &self.payload
    }

    async fn respond(self, answer: Bytes) -> Result<(), Error> {
        if let Some(reply) = self.reply {
            // Full: another server answered first. Closed: the requester
            // stopped waiting. Neither is this server's fault.
            let _ = reply.try_send(answer);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn patterns_match_as_nats_subjects_do() {
        let m = |pat: &str, sub: &str| matches(&p(pat), &sub.split('.').collect::<Vec<_>>());
        assert!(m("a.b", "a.b"));
        assert!(!m("a.b", "a.b.c"));
        assert!(!m("a.b.c", "a.b"));
        assert!(m("a.*", "a.x"));
        assert!(!m("a.*", "a.x.y"));
        assert!(m("a.>", "a.x.y"));
        assert!(m("a.>", "a.x"));
        assert!(!m("a.>", "a"));
        assert!(m("*.b.>", "z.b.c"));
    }

    #[test]
    fn bad_subjects_are_refused() {
        for s in ["", "a..b", "a. b", ".a", "a.", "a.>.b"] {
            assert!(matches!(tokens(s, true), Err(Error::BadConfig(_))), "{s:?}");
        }
        assert!(matches!(tokens("a.*", false), Err(Error::BadConfig(_))));
        assert!(tokens("a.*.>", true).is_ok());
    }
}
