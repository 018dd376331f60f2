//! `waybill dlq`: the dead letters, listed, shown, sent back to their step
//! (redriven) or deleted (purged).
//!
//! A redrive sends the stored hop back to the subject it came from, its
//! history intact: the step runs again with the same idempotency key, so
//! the services apply its effect once. Before it does, it asks the
//! coordinator where the order stands, and refuses when the order has moved
//! past the dead letter's hop or has ended: sending it back then would run a
//! second copy of the order. `--force` skips the check (no coordinator
//! running, or an order it no longer tracks).

use std::time::Duration;

use serde::Serialize;
use waybill::coordinator::api::{rfc3339, StatusReply};
use waybill::coordinator::{CoordinatorClient, RequestError};
use waybill::headers::CONTENT_TYPE;
use waybill::transport::nats::{Nats, StoredLetter};
use waybill::transport::{DeadLetterKind, Error as TransportError};
use waybill::Timestamp;
use waybill::{Codec, OrderId, Status};

/// Why a `waybill dlq` command failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("no dead letter {0} (list them with `waybill dlq list`)")]
    NotFound(u64),
    #[error("`{0}` is not a duration: write it like 90s, 15m, 2h or 1d")]
    BadDuration(String),
}

/// Which dead letters a command takes.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub kind: Option<DeadLetterKind>,
    /// A service subject (`payment.charge`): the step the letter came from.
    pub service: Option<String>,
    /// Stored at most this long ago.
    pub since: Option<Duration>,
}

impl Filter {
    pub fn matches(&self, letter: &StoredLetter, now: Timestamp) -> bool {
        self.kind.is_none_or(|k| letter.kind == Some(k))
            && self.service.as_deref().is_none_or(|s| service_of(letter) == s)
            && self.since.is_none_or(|d| now.since(letter.stored_at) <= d)
    }
}

/// Parses `90s`, `15m`, `2h`, `1d` (or a bare number of seconds).
pub fn parse_duration(text: &str) -> Result<Duration, DlqError> {
    let bad = || DlqError::BadDuration(text.to_owned());
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(bad)
}

/// The step a dead letter came from (`payment.charge`).
fn service_of(letter: &StoredLetter) -> &str {
    letter
        .subject
        .strip_prefix(waybill::subject::DLQ_PREFIX)
        .unwrap_or(&letter.subject)
}

/// A dead letter as the commands show it.
#[derive(Debug, Clone, Serialize)]
pub struct LetterView {
    pub sequence: u64,
    pub stored_at: String,
    pub kind: String,
    pub service: String,
    pub consumer: String,
    pub reason: String,
    /// What its document says, when it can be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<OrderId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hop: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Why the document cannot be read, if it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undecodable: Option<String>,
}

impl LetterView {
    pub fn of(letter: &StoredLetter, codec: &Codec) -> Self {
        let mut view = Self {
            sequence: letter.sequence,
            stored_at: rfc3339(letter.stored_at),
            kind: letter.kind_text.clone(),
            service: service_of(letter).to_owned(),
            consumer: letter.consumer.clone(),
            reason: letter.reason.clone(),
            order: None,
            hop: None,
            status: None,
            step: None,
            attempt: None,
            undecodable: None,
        };
        match codec.decode_as(&letter.payload, letter.headers.get(CONTENT_TYPE)) {
            Ok(doc) => {
                view.step = doc.route.steps.get(usize::from(doc.step)).map(|s| s.name.to_string());
                view.order = Some(doc.id);
                view.hop = Some(doc.hop);
                view.status = Some(doc.status);
                view.attempt = Some(doc.attempt);
            }
            Err(e) => view.undecodable = Some(e.to_string()),
        }
        view
    }
}

/// The dead letters that `filter` takes, oldest first.
pub async fn list(nats: &Nats, filter: &Filter) -> Result<Vec<StoredLetter>, DlqError> {
    let now = Timestamp::now();
    let mut letters = nats.dead_letters().await?;
    letters.retain(|l| filter.matches(l, now));
    Ok(letters)
}

/// The dead letters named by their sequences, each of which must be there.
pub async fn named(nats: &Nats, sequences: &[u64]) -> Result<Vec<StoredLetter>, DlqError> {
    let mut out = Vec::with_capacity(sequences.len());
    for &seq in sequences {
        out.push(nats.dead_letter_at(seq).await?.ok_or(DlqError::NotFound(seq))?);
    }
    Ok(out)
}

pub fn print_list(views: &[LetterView]) {
    if views.is_empty() {
        println!("no dead letters");
        return;
    }
    println!(
        "{:>6}  {:<24}  {:<11}  {:<20}  {:<36}  {:>3}  reason",
        "seq", "stored", "kind", "service", "order", "hop"
    );
    for v in views {
        let order = v.order.map(|o| o.to_string()).unwrap_or_else(|| "(undecodable)".into());
        let hop = v.hop.map(|h| h.to_string()).unwrap_or_default();
        println!(
            "{:>6}  {:<24}  {:<11}  {:<20}  {:<36}  {:>3}  {}",
            v.sequence,
            v.stored_at,
            v.kind,
            v.service,
            order,
            hop,
            shorten(&v.reason, 80)
        );
    }
    println!("{} dead letter(s)", views.len());
}

pub fn print_one(v: &LetterView) {
    println!("dead letter {}", v.sequence);
    println!("  stored   {}", v.stored_at);
    println!("  kind     {}", v.kind);
    println!("  service  {} (consumer {})", v.service, v.consumer);
    println!("  reason   {}", v.reason);
    match (&v.order, &v.undecodable) {
        (Some(order), _) => {
            println!("  order    {order}");
            println!(
                "  at       hop {}, step {}, attempt {}, {}",
                v.hop.unwrap_or_default(),
                v.step.as_deref().unwrap_or("?"),
                v.attempt.unwrap_or_default(),
                v.status.map(|s| s.to_string()).unwrap_or_default()
            );
        }
        (None, Some(why)) => println!("  document cannot be read: {why}"),
        (None, None) => {}
    }
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// What became of one dead letter a redrive was asked for.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase", tag = "result")]
pub enum Redriven {
    /// Sent back to its step (stored at this sequence of the hop stream)
    /// and deleted from the dead letters.
    Sent { sequence: u64, to: u64, duplicate: bool },
    /// Not sent, and why; it stays a dead letter.
    Refused { sequence: u64, why: String },
}

/// Whether a dead letter may go back to its step, given where the
/// coordinator says its order stands: only while the order still stands at
/// the letter's hop (nothing moved it on since) and has not ended.
pub fn may_redrive(letter_hop: u32, order: &StatusReply) -> Result<(), String> {
    if order.status.is_terminal() {
        return Err(format!("order {} already ended {}", order.id, order.status));
    }
    if order.hop > letter_hop {
        return Err(format!(
            "order {} has moved on to hop {} since this hop {}: sending it back would run the order twice",
            order.id, order.hop, letter_hop
        ));
    }
    Ok(())
}

/// Sends each letter back to its step, unless (without `force`) the
/// coordinator says its order moved on or ended, or does not answer for it.
pub async fn redrive(
    nats: &Nats,
    letters: &[StoredLetter],
    force: bool,
    timeout: Duration,
    codec: &Codec,
) -> Result<Vec<Redriven>, DlqError> {
    let coordinator = CoordinatorClient::new(nats.clone(), timeout);
    let mut out = Vec::with_capacity(letters.len());
    for letter in letters {
        let refused = |why: String| Redriven::Refused {
            sequence: letter.sequence,
            why,
        };
        if !force {
            let doc = match codec.decode_as(&letter.payload, letter.headers.get(CONTENT_TYPE)) {
                Ok(doc) => doc,
                Err(e) => {
                    out.push(refused(format!(
                        "its document cannot be read ({e}): it would come back at once; --force sends it anyway"
                    )));
                    continue;
                }
            };
            let check = match coordinator.status(&doc.id).await {
                Ok(status) => may_redrive(doc.hop, &status),
                Err(RequestError::Transport(e)) => Err(format!(
                    "no coordinator answered for order {} ({e}); --force sends it without the check",
                    doc.id
                )),
                Err(e) => Err(format!(
                    "the coordinator cannot tell where order {} stands ({e}); --force sends it without the check",
                    doc.id
                )),
            };
            if let Err(why) = check {
                out.push(refused(why));
                continue;
            }
        }
        let ack = nats.redrive_dead_letter(letter).await?;
        out.push(Redriven::Sent {
            sequence: letter.sequence,
            to: ack.sequence,
            duplicate: ack.duplicate,
        });
    }
    Ok(out)
}

pub fn print_redriven(results: &[Redriven]) {
    for r in results {
        match r {
            Redriven::Sent {
                sequence,
                to,
                duplicate,
            } => {
                let again = if *duplicate { " (sent already)" } else { "" };
                println!("{sequence}: sent back to its step as hop-stream message {to}{again}");
            }
            Redriven::Refused { sequence, why } => println!("{sequence}: not sent: {why}"),
        }
    }
}
