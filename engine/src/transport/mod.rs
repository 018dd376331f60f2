//! The transport seam: everything above it (client, worker runtime,
//! coordinator) is written once; below it are the transports.
//!
//! The model is JetStream's: one stream stores every published message; a
//! durable consumer with a filter subject hands messages to any number of
//! processes that share it; each delivery is acknowledged explicitly, or
//! negatively (with a delay) to have it redelivered, and is redelivered anyway
//! when its ack deadline passes; a message delivered `max_deliver` times is
//! not delivered again. A message published with a deduplication id that was
//! already stored (inside the duplicate window) is dropped.
//!
//! Three traits. [`Transport`] publishes, opens consumers and stores dead
//! letters: what the client and the worker runtime need. [`HopLog`] reads
//! the stream as a log, as the coordinator does: in order from any sequence
//! and then live ([`HopLog::read_log`]), one message by its sequence
//! ([`HopLog::get`]), and where each durable consumer stands
//! ([`HopLog::consumer_position`]). [`Rpc`] carries the coordinator's API
//! beside the stream: plain requests and answers ([`Rpc::serve`],
//! [`Rpc::request`]) and events nobody stores ([`Rpc::announce`]).
//!
//! [`Embedded`] implements the seam in one process, [`Nats`] on NATS
//! JetStream across hosts. The conformance suite in
//! `conformance` (cargo feature `conformance`) checks any implementation
//! against these rules, seam by seam.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::document::Timestamp;
use crate::id::{MsgId, OrderId, SignalName};

mod cancels;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod embedded;
pub mod fault;
pub mod nats;

// Defined beside the header names, so `headers` needs nothing from here.
pub use crate::headers::{HeaderValue, Headers};
pub use embedded::{ConsumerStats, Embedded, EmbeddedConfig, EmbeddedConsumer, EmbeddedDelivery, EmbeddedLog};
pub use nats::{Nats, NatsConfig};

/// A signal as a transport keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptSignal {
    /// Its JSON.
    pub data: String,
    /// When it was kept (the store's clock): a signal kept after its
    /// step's deadline came too late, however late the step is read.
    pub at: Timestamp,
}

/// Why a transport operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("transport is closed")]
    Closed,
    #[error("timed out: {0}")]
    TimedOut(String),
    #[error("consumer `{0}` does not exist")]
    NoConsumer(String),
    /// A configuration problem (of a consumer, a stream, or the server).
    #[error("{0}")]
    BadConfig(String),
    #[error("message of {size} bytes exceeds the transport's limit of {max}")]
    TooLarge { size: usize, max: usize },
    /// The infrastructure is unavailable for now (no responders, no
    /// stream while a leader is elected, a time-out, a lost connection,
    /// JetStream not ready): the same again later may succeed. A fault of
    /// the infrastructure, never a business failure.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A request nobody serves (no process subscribed to its subject). An
    /// infrastructure fault: the serving process may be starting.
    #[error("nobody answers requests on `{0}`")]
    NoResponders(String),
    #[error("{message}")]
    Other { message: String, retryable: bool },
}

impl Error {
    /// Whether doing the same again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::TimedOut(_) | Error::Unavailable(_) | Error::NoResponders(_) => true,
            Error::Other { retryable, .. } => *retryable,
            Error::Closed | Error::NoConsumer(_) | Error::BadConfig(_) | Error::TooLarge { .. } => false,
        }
    }

    /// Whether this is a fault of the infrastructure (see
    /// [`Error::Unavailable`]), which a worker waits out without spending
    /// a step's attempts.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::TimedOut(_) | Error::Unavailable(_) | Error::NoResponders(_)
        )
    }
}

/// A stored message as a consumer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
}

/// A message as the stream stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub sequence: u64,
    /// When the stream stored it (wall clock).
    pub stored_at: Timestamp,
    pub message: Message,
}

/// How much of the log is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogInfo {
    /// Messages kept now: older ones may have been removed by the log's
    /// limits (age, size, count).
    pub messages: u64,
    /// The sequence of the oldest message kept (0 when none is).
    pub first_sequence: u64,
    /// The sequence of the last message stored (0 when none ever was).
    pub last_sequence: u64,
}

/// Where a durable consumer stands in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerPosition {
    pub durable: String,
    /// Every message of the consumer up to this sequence is settled
    /// (acknowledged, or terminated): nothing will deliver it again.
    pub ack_floor: u64,
    /// The highest sequence delivered so far.
    pub delivered: u64,
    /// Messages not delivered yet.
    pub pending: u64,
    /// Fetches waiting for messages now: how many processes are pulling.
    pub waiting: u64,
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    /// Deduplication id (`Nats-Msg-Id`): a second message with the same id
    /// inside the duplicate window is not stored again.
    pub msg_id: Option<MsgId>,
    pub headers: Headers,
    pub payload: Bytes,
    /// Set on a hop that is not due yet (a step's wait, a retry's
    /// backoff): a transport may keep it from consumers until it is due.
    /// A worker that sees a hop early hands it back until it is due, so a
    /// transport may also ignore this.
    pub due: Option<Due>,
}

/// When a hop is due, and whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub at: crate::document::Timestamp,
    pub order: crate::id::OrderId,
    /// The fork and branch, for a branch's hop: each branch sleeps apart.
    pub branch: Option<(u8, u8)>,
}

impl Due {
    /// When `doc`'s hop is due, if it is not yet.
    pub fn of(doc: &crate::document::Document) -> Option<Self> {
        doc.not_before.map(|at| Self {
            at,
            order: doc.id,
            branch: doc.branch.map(|b| (b.fork, b.branch)),
        })
    }
}

/// The stream's answer to a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishAck {
    /// Stream sequence of the stored message (of the first copy, for a
    /// duplicate).
    pub sequence: u64,
    /// The message was a duplicate and was not stored again.
    pub duplicate: bool,
}

/// [`ConsumerConfig::prefetch`] unless told otherwise.
pub const DEFAULT_PREFETCH: usize = 32;

/// A durable consumer: a named position in the stream, shared by every
/// process that opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    pub durable: String,
    /// One subject, or a prefix ending in `.>`.
    pub filter: String,
    /// How long a delivery may stay unacknowledged before it is redelivered.
    pub ack_wait: Duration,
    /// Deliveries of one message at most.
    pub max_deliver: u32,
    /// Shared by many processes, or private to one.
    pub kind: ConsumerKind,
    /// Messages this process asks for ahead of taking them: the batch of a
    /// NATS pull request (the embedded transport hands messages over in
    /// place and ignores it). Bigger batches spare the server pull
    /// requests and deliver in bursts; what a process holds, it must keep
    /// alive or hand back (the worker's pump does both).
    pub prefetch: usize,
}

/// Who a consumer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConsumerKind {
    /// Shared by every process that opens it (a service's work queue): it
    /// starts at the first stored message and lives until deleted.
    #[default]
    Shared,
    /// One process's own (a client following finished orders): it starts at
    /// messages published from now on, and the server removes it some time
    /// after its process stopped pulling.
    Private,
}

impl ConsumerConfig {
    pub fn new(durable: impl Into<String>, filter: impl Into<String>) -> Self {
        Self {
            durable: durable.into(),
            filter: filter.into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            kind: ConsumerKind::Shared,
            prefetch: DEFAULT_PREFETCH,
        }
    }

    /// Whether `other` describes the same durable consumer: every setting
    /// but the prefetch, which is each process's own.
    pub fn same_consumer(&self, other: &Self) -> bool {
        Self {
            prefetch: other.prefetch,
            ..self.clone()
        } == *other
    }

    /// Asks for `n` messages at a time (at least one).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
        self
    }

    /// A consumer private to this process (see [`ConsumerKind::Private`]).
    pub fn private(mut self) -> Self {
        self.kind = ConsumerKind::Private;
        self
    }
}

/// Why a message became a dead letter, as a code to decide on (the
/// `Waybill-Dlq-Kind` header); the reason text is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterKind {
    /// It cannot be processed as it is: undecodable, failing verification,
    /// misaddressed, of an unknown workflow, or terminal already.
    Invalid,
    /// Its deliveries ran out (a worker died or hung on it every time, or
    /// it could not be handed on).
    Exhausted,
    /// The infrastructure its step needs stayed unavailable past the
    /// worker's limit. Nothing failed: redrive it once the outage is over.
    Unavailable,
}

impl DeadLetterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::Invalid => "invalid",
            DeadLetterKind::Exhausted => "exhausted",
            DeadLetterKind::Unavailable => "unavailable",
        }
    }
}

/// A dead letter's kind code this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dead-letter kind `{0}` (known: invalid, exhausted, unavailable)")]
pub struct UnknownKind(pub String);

impl std::str::FromStr for DeadLetterKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, UnknownKind> {
        [
            DeadLetterKind::Invalid,
            DeadLetterKind::Exhausted,
            DeadLetterKind::Unavailable,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

impl fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message that cannot be processed, kept with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message: Message,
    pub kind: DeadLetterKind,
    pub reason: String,
    /// Where the message was: the consumer that gave up on it.
    pub consumer: String,
}

/// The seam. Cheap to clone; clones share the connection.
pub trait Transport: Clone + Send + Sync + 'static {
    type Consumer: Consumer;

    /// Publishes and waits until the message is stored (or recognised as a
    /// duplicate).
    fn publish(&self, msg: Outgoing) -> impl Future<Output = Result<PublishAck, Error>> + Send;

    /// Opens the durable consumer, creating it if it does not exist.
    fn consumer(&self, config: ConsumerConfig) -> impl Future<Output = Result<Self::Consumer, Error>> + Send;

    /// Stores a dead letter.
    fn dead_letter(&self, letter: DeadLetter) -> impl Future<Output = Result<(), Error>> + Send;

    /// Deletes a durable consumer and what it held for delivery (for
    /// consumers of one process, such as a client's). Deleting one that does
    /// not exist is not an error.
    fn delete_consumer(&self, durable: &str) -> impl Future<Output = Result<(), Error>> + Send;

    /// Sends whatever this connection still holds (acknowledgements are
    /// queued, not awaited) to the server. A process that stops calls it
    /// last, so no step it finished is delivered again.
    fn flush(&self) -> impl Future<Output = Result<(), Error>> + Send {
        std::future::ready(Ok(()))
    }

    /// Asks for `order` to be cancelled at its next hop (see
    /// [`crate::transition::cancel`]), for every process serving it.
    /// `Ok(false)` if it was asked already (the first reason stays).
    fn request_cancel(&self, order: OrderId, reason: &str) -> impl Future<Output = Result<bool, Error>> + Send {
        let _ = (order, reason);
        std::future::ready(Err(Error::BadConfig("this transport cannot cancel orders".into())))
    }

    /// Starts following the cancels asked for anywhere, so that
    /// [`Transport::cancel_requested`] knows them: a worker calls it once
    /// before it serves. Returns once the ones already asked for are known.
    fn follow_cancels(&self) -> impl Future<Output = Result<(), Error>> + Send {
        std::future::ready(Ok(()))
    }

    /// Why `order` is to be cancelled, if this process knows of a cancel (a
    /// cancel asked on another host arrives within moments).
    fn cancel_requested(&self, order: &OrderId) -> Option<String> {
        let _ = order;
        None
    }

    /// Delivers the signal `name`, with its JSON `data`, to `order`: kept
    /// for the step that waits for it (one signal of a name per order), and
    /// the order woken ([`Transport::wake`]) in case it waits now.
    /// `Ok(false)` when the order had it already: a duplicate, not kept
    /// (the first stays).
    fn send_signal(
        &self,
        order: OrderId,
        name: &SignalName,
        data: &str,
    ) -> impl Future<Output = Result<bool, Error>> + Send {
        let _ = (order, name, data);
        std::future::ready(Err(Error::BadConfig("this transport cannot keep signals".into())))
    }

    /// The signal `name` delivered to `order`, if it was: its JSON and when
    /// it was kept.
    fn signal(
        &self,
        order: &OrderId,
        name: &SignalName,
    ) -> impl Future<Output = Result<Option<KeptSignal>, Error>> + Send {
        let _ = (order, name);
        std::future::ready(Err(Error::BadConfig("this transport cannot keep signals".into())))
    }

    /// The record of `order`'s join of fork `fork` ([`crate::join`]) and its
    /// revision, if there is one.
    fn join_state(&self, order: &OrderId, fork: u8) -> impl Future<Output = Result<Option<(Bytes, u64)>, Error>> + Send {
        let _ = (order, fork);
        std::future::ready(Err(Error::BadConfig("this transport cannot keep joins".into())))
    }

    /// Writes the record of `order`'s join of fork `fork` if its revision
    /// is still `expected` (0: if there is none yet). `Ok(false)` when
    /// another write came first: read it again.
    fn put_join_state(
        &self,
        order: OrderId,
        fork: u8,
        state: Bytes,
        expected: u64,
    ) -> impl Future<Output = Result<bool, Error>> + Send {
        let _ = (order, fork, state, expected);
        std::future::ready(Err(Error::BadConfig("this transport cannot keep joins".into())))
    }

    /// Makes the hop of `order` that sleeps until it is due (a step's wait,
    /// a signal's deadline, a long backoff) come now; with `signal`, only
    /// a hop that waits for that signal (its `Waybill-Awaits` header).
    /// Nothing when no such hop sleeps.
    fn wake(&self, order: OrderId, signal: Option<&SignalName>) -> impl Future<Output = Result<(), Error>> + Send {
        let _ = (order, signal);
        std::future::ready(Ok(()))
    }
}

/// The stream read as a log: what the coordinator follows. Every transport
/// whose stream keeps its messages implements it.
pub trait HopLog: Transport {
    type Reader: LogReader;

    /// How much of the log is there.
    fn log_info(&self) -> impl Future<Output = Result<LogInfo, Error>> + Send;

    /// Reads the log in order from `from` (or from its oldest message, if
    /// that one is gone), then every message stored later as it comes.
    fn read_log(&self, from: u64) -> impl Future<Output = Result<Self::Reader, Error>> + Send;

    /// One stored message; `None` when no message has that sequence (never
    /// stored, or removed by the log's limits).
    fn get(&self, sequence: u64) -> impl Future<Output = Result<Option<Stored>, Error>> + Send;

    /// Where a durable consumer stands; `None` when it does not exist.
    fn consumer_position(&self, durable: &str) -> impl Future<Output = Result<Option<ConsumerPosition>, Error>> + Send;
}

/// Requests, answers and events beside the stream: how the coordinator's
/// API is reached.
pub trait Rpc: Transport {
    type Requests: Requests;

    /// Receives the requests (and announcements) sent to any of
    /// `subjects`, each given to one process of those serving in `group`.
    /// A subject's token `*` matches any one token, a last token `>` one or
    /// more.
    fn serve(&self, subjects: &[String], group: &str) -> impl Future<Output = Result<Self::Requests, Error>> + Send;

    /// Sends a request and waits at most `timeout` for its answer:
    /// [`Error::NoResponders`] when nobody serves the subject,
    /// [`Error::TimedOut`] when no answer came in time.
    fn request(
        &self,
        subject: String,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> impl Future<Output = Result<Bytes, Error>> + Send;

    /// Publishes an event nobody stores, for whoever serves its subject now.
    fn announce(&self, subject: String, payload: Bytes) -> impl Future<Output = Result<(), Error>> + Send;
}

/// A reader of the log, in order.
pub trait LogReader: Send + 'static {
    /// Waits for at least one message and returns up to `max`, in sequence
    /// order. After an error the reader is spent: open a new one after the
    /// last message read. Cancel-safe.
    fn next_batch(&mut self, max: usize) -> impl Future<Output = Result<Vec<Stored>, Error>> + Send;
}

/// The requests sent to what a process serves.
pub trait Requests: Send + 'static {
    type Request: Request;

    /// The next request; `None` once nothing more will come.
    fn next(&mut self) -> impl Future<Output = Option<Self::Request>> + Send;
}

/// One request to answer.
pub trait Request: Send + Sync + 'static {
    fn subject(&self) -> &str;
    fn headers(&self) -> &Headers;
    fn payload(&self) -> &Bytes;
    /// Answers it (an announcement, which expects no answer, ignores it).
    fn respond(self, answer: Bytes) -> impl Future<Output = Result<(), Error>> + Send;
}

/// One process's handle on a durable consumer.
pub trait Consumer: Send + 'static {
    type Delivery: Delivery;

    /// Waits for at least one message and returns up to `max`. Cancel-safe:
    /// dropping the future loses no message.
    fn fetch(&mut self, max: usize) -> impl Future<Output = Result<Vec<Self::Delivery>, Error>> + Send;
}

/// One delivery of one message.
pub trait Delivery: Send + Sync + 'static {
    fn message(&self) -> &Message;
    /// How often this message has been delivered, this time included.
    fn delivered(&self) -> u32;
    /// The message's sequence in the stream.
    fn sequence(&self) -> u64;
    /// Done: never deliver it again.
    fn ack(self) -> impl Future<Output = Result<(), Error>> + Send;
    /// Not done: deliver it again, after `delay` if given.
    fn nak(self, delay: Option<Duration>) -> impl Future<Output = Result<(), Error>> + Send;
    /// Still working: restart the ack deadline.
    fn in_progress(&self) -> impl Future<Output = Result<(), Error>> + Send;
    /// Never deliver it again, without it being done (it was dead-lettered).
    fn term(self) -> impl Future<Output = Result<(), Error>> + Send;
}
