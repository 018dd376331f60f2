//! Newtypes for every identity that travels in a document or a subject.
//!
//! Names that end up in NATS subjects (`ServiceSubject`, workflow names) are
//! validated once, at construction, so nothing downstream has to re-check them.

use std::fmt;
use std::str::FromStr;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} `{name}` is longer than {max} characters")]
    TooLong {
        kind: &'static str,
        name: String,
        max: usize,
    },
    #[error("{kind} `{name}` contains `{bad}`; allowed are letters, digits, `-` and `_`, with `.` between tokens")]
    BadCharacter {
        kind: &'static str,
        name: String,
        bad: char,
    },
    #[error("{kind} `{name}` has an empty token (leading, trailing or doubled `.`)")]
    EmptyToken { kind: &'static str, name: String },
    #[error("`{0}` is not an order id (a UUID is expected)")]
    BadOrderId(String),
}

const MAX_NAME: usize = 128;

/// Checks a name made of tokens separated by `.`, each token of
/// `[A-Za-z0-9_-]`. That is a safe NATS subject fragment: no wildcards, no
/// whitespace, no empty tokens.
fn check_dotted(kind: &'static str, name: &str, allow_dots: bool) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong {
            kind,
            name: name.to_owned(),
            max: MAX_NAME,
        });
    }
    // Fast path: a byte loop (this runs for every name of every decoded hop).
    let mut prev_dot = true;
    let mut empty_token = false;
    for &b in name.as_bytes() {
        let dot = b == b'.';
        if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (allow_dots && dot)) {
            let bad = name
                .chars()
                .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || (allow_dots && c == '.')));
            return Err(NameError::BadCharacter {
                kind,
                name: name.to_owned(),
                bad: bad.unwrap_or('?'),
            });
        }
        empty_token |= dot && prev_dot;
        prev_dot = dot;
    }
    if allow_dots && (empty_token || prev_dot) {
        return Err(NameError::EmptyToken {
            kind,
            name: name.to_owned(),
        });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$meta:meta])* $name:ident, $kind:literal, dots = $dots:literal) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(CompactString);

        impl $name {
            /// Validates and wraps a name.
            pub fn new(name: impl AsRef<str>) -> Result<Self, NameError> {
                let name = name.as_ref();
                check_dotted($kind, name, $dots)?;
                Ok(Self(CompactString::new(name)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Deserialisation validates too: a document off the wire cannot smuggle
        // a wildcard into a subject.
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = CompactString::deserialize(d)?;
                check_dotted($kind, &s, $dots).map_err(serde::de::Error::custom)?;
                Ok(Self(s))
            }
        }
    };
}

name_type!(
    /// A service subject such as `payment.charge`: what a step asks for. One
    /// service can serve many workflows.
    ServiceSubject,
    "service subject",
    dots = true
);
name_type!(
    /// The name of a step inside one workflow, such as `charge`.
    StepName,
    "step name",
    dots = false
);
name_type!(
    /// The name of a workflow, such as `order`.
    WorkflowName,
    "workflow name",
    dots = false
);
name_type!(
    /// A business outcome a handler reports, such as `ok` or `declined`.
    Outcome,
    "outcome",
    dots = false
);
name_type!(
    /// The name of a signal an order can wait for, such as `approved`.
    SignalName,
    "signal name",
    dots = false
);

impl Outcome {
    /// The outcome of a step that did what it was asked.
    pub fn ok() -> Self {
        Self(CompactString::const_new("ok"))
    }

    pub fn is_ok(&self) -> bool {
        self.0 == "ok"
    }
}

/// The identity of one workflow instance (an order): a UUID v7, so ids sort by
/// creation time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(uuid::Uuid);

impl OrderId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    pub fn from_uuid(id: uuid::Uuid) -> Self {
        Self(id)
    }

    pub fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }
}

impl Default for OrderId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for OrderId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        uuid::Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| NameError::BadOrderId(s.to_owned()))
    }
}

/// The deduplication id of one hop: `<order id>:<hop index>`, or
/// `<order id>:<fork>.<branch>:<hop index>` for a hop of a branch (whose
/// hops are counted apart). A hop published twice with the same id is
/// stored once.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct DedupId {
    pub order: OrderId,
    pub hop: u32,
    /// The fork and branch of a branch's hop.
    pub branch: Option<(u8, u8)>,
}

impl DedupId {
    /// The id of the order's own hop `hop`.
    pub fn main(order: OrderId, hop: u32) -> Self {
        Self {
            order,
            hop,
            branch: None,
        }
    }
}

impl fmt::Display for DedupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.branch {
            None => write!(f, "{}:{}", self.order, self.hop),
            Some((fork, branch)) => write!(f, "{}:{fork}.{branch}:{}", self.order, self.hop),
        }
    }
}

/// A message's deduplication id (`Nats-Msg-Id`): a second message with the
/// same id inside the stream's duplicate window is not stored again. One
/// constructor per kind of id Waybill writes; its text (its `Display`) is
/// what goes on the wire.
#[derive(Clone, Debug)]
pub struct MsgId(MsgIdKind);

#[derive(Clone, Debug)]
enum MsgIdKind {
    Hop(DedupId),
    Redrive { hop: DedupId, sequence: u64 },
    Exhausted { sequence: u64 },
    DeadLetterRedrive { sequence: u64 },
    Custom(String),
}

impl MsgId {
    /// A hop's own id, `<order id>:<hop>`: a hop published twice is stored
    /// once.
    pub fn hop(id: DedupId) -> Self {
        Self(MsgIdKind::Hop(id))
    }

    /// The coordinator's re-drive of `hop`, stored at `sequence`:
    /// `<order id>:<hop>:redrive:<sequence>`, so every coordinator that
    /// re-drives the same stored hop stores it once, and the worker's own
    /// next hop keeps its usual id.
    pub fn redrive(hop: DedupId, sequence: u64) -> Self {
        Self(MsgIdKind::Redrive { hop, sequence })
    }

    /// The dead letter of the message stored at `sequence` that ran out of
    /// deliveries: `exhausted:<sequence>`, so every process watching stores
    /// it once.
    pub fn exhausted(sequence: u64) -> Self {
        Self(MsgIdKind::Exhausted { sequence })
    }

    /// A dead letter (stored at `sequence` in the dead-letter stream) sent
    /// back to its step: `dlq:<sequence>:redrive`, so a redrive repeated
    /// inside the duplicate window is stored once.
    pub fn dead_letter_redrive(sequence: u64) -> Self {
        Self(MsgIdKind::DeadLetterRedrive { sequence })
    }

    /// Any other id, as given.
    pub fn custom(id: impl Into<String>) -> Self {
        Self(MsgIdKind::Custom(id.into()))
    }

    /// The hop this is the own id of (not a re-drive's), if it is one:
    /// lets a transport key it without reading text.
    pub fn as_hop(&self) -> Option<DedupId> {
        match &self.0 {
            MsgIdKind::Hop(id) => Some(*id),
            _ => None,
        }
    }

    /// The text of a custom id, which no constructor built; `None` for the
    /// others (their text is their `Display`).
    pub fn as_custom(&self) -> Option<&str> {
        match &self.0 {
            MsgIdKind::Custom(id) => Some(id),
            _ => None,
        }
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            MsgIdKind::Hop(id) => fmt::Display::fmt(id, f),
            MsgIdKind::Redrive { hop, sequence } => write!(f, "{hop}:redrive:{sequence}"),
            MsgIdKind::Exhausted { sequence } => write!(f, "exhausted:{sequence}"),
            MsgIdKind::DeadLetterRedrive { sequence } => write!(f, "dlq:{sequence}:redrive"),
            MsgIdKind::Custom(id) => f.write_str(id),
        }
    }
}

/// Ids are equal when their text is: a custom id spelled as a hop's is the
/// hop's id, as the stream sees it.
impl PartialEq for MsgId {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (MsgIdKind::Hop(a), MsgIdKind::Hop(b)) => a == b,
            _ => self.to_string() == other.to_string(),
        }
    }
}

impl Eq for MsgId {}

impl From<DedupId> for MsgId {
    fn from(id: DedupId) -> Self {
        Self::hop(id)
    }
}

/// Names the process (and task) that ran a step, for the history.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(CompactString);

impl WorkerId {
    pub fn new(name: impl AsRef<str>) -> Self {
        Self(CompactString::new(name.as_ref()))
    }

    /// `<host>-<pid>`: good enough to tell processes apart in a history.
    pub fn from_process() -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_owned());
        Self(compact_str::format_compact!("{host}-{}", std::process::id()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_validated() {
        assert!(ServiceSubject::new("payment.charge").is_ok());
        assert!(matches!(
            ServiceSubject::new("payment.*"),
            Err(NameError::BadCharacter { bad: '*', .. })
        ));
        assert!(matches!(
            ServiceSubject::new("payment..charge"),
            Err(NameError::EmptyToken { .. })
        ));
        assert!(matches!(ServiceSubject::new(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            StepName::new("a.b"),
            Err(NameError::BadCharacter { bad: '.', .. })
        ));
    }

    #[test]
    fn deserialising_validates() {
        let bad: Result<ServiceSubject, _> = serde_json::from_str("\"a >\"");
        assert!(bad.is_err());
    }

    #[test]
    fn dedup_id_format() {
        let id: OrderId = "01890a5d-ac96-774b-bcce-b302099a8057".parse().unwrap();
        assert_eq!(
            DedupId::main(id, 3).to_string(),
            "01890a5d-ac96-774b-bcce-b302099a8057:3"
        );
        // A branch's hops are counted apart: fork 0, branch 2.
        let branch = DedupId {
            branch: Some((0, 2)),
            ..DedupId::main(id, 3)
        };
        assert_eq!(branch.to_string(), "01890a5d-ac96-774b-bcce-b302099a8057:0.2:3");
    }

    #[test]
    fn msg_id_text_of_each_kind() {
        let order: OrderId = "01890a5d-ac96-774b-bcce-b302099a8057".parse().unwrap();
        let hop = DedupId::main(order, 3);
        assert_eq!(MsgId::hop(hop).to_string(), "01890a5d-ac96-774b-bcce-b302099a8057:3");
        assert_eq!(MsgId::from(hop).as_hop(), Some(hop));
        assert_eq!(
            MsgId::redrive(hop, 4021).to_string(),
            "01890a5d-ac96-774b-bcce-b302099a8057:3:redrive:4021"
        );
        assert_eq!(MsgId::redrive(hop, 4021).as_hop(), None);
        assert_eq!(MsgId::exhausted(17).to_string(), "exhausted:17");
        assert_eq!(MsgId::custom("m:0").to_string(), "m:0");
        assert_eq!(MsgId::custom("m:0").as_custom(), Some("m:0"));
        assert_eq!(MsgId::hop(hop), MsgId::custom("01890a5d-ac96-774b-bcce-b302099a8057:3"));
        assert_ne!(MsgId::hop(hop), MsgId::redrive(hop, 1));
    }
}
