//! Atomic batch publish (nats-server 2.12+, ADR-50): several messages to one
//! stream stored all together or not at all, each only if its subject's
//! last sequence is the one expected. On a KV bucket's stream that is a
//! multi-key compare-and-swap in one round trip: what lets a service change
//! several keys (stock levels and an order's record) as one write.
//!
//! The stream must allow it (`allow_atomic`). The messages before the last
//! are plain publishes (no reply: the connection keeps their order); the
//! last carries the commit and is answered with the batch's publish ack, or
//! with the error that rejected the whole batch.

use bytes::Bytes;

use super::{nats_err, Nats};
use crate::transport::fault::{self, Fault};
use crate::transport::Error;

/// The most messages one batch may hold (the server's default limit).
pub const MAX_BATCH: usize = 1000;

/// One message of an atomic batch.
#[derive(Debug, Clone)]
pub struct AtomicWrite {
    pub subject: String,
    pub payload: Bytes,
    /// Store the batch only if the subject's last sequence in the stream is
    /// this (0: the subject has no message yet); `None` expects nothing.
    pub expect_last: Option<u64>,
}

/// What the server stored: the batch's messages have the sequences
/// `first..=last`, in the order they were given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtomicAck {
    pub first: u64,
    pub last: u64,
}

/// Why an atomic batch was not stored, told apart by the server's error kind
/// and code ([`fault::classify`]), never by its text.
#[derive(Debug, thiserror::Error)]
pub enum AtomicError {
    /// A message's expected last sequence did not hold (another writer was
    /// first): nothing of the batch was stored.
    #[error("atomic batch refused, an expected sequence did not hold: {0}")]
    Conflict(String),
    /// The infrastructure did not answer (a time-out, a lost connection, a
    /// leader being elected): the batch may or may not have been stored.
    #[error("atomic batch not confirmed: {0}")]
    Unavailable(String),
    /// Anything else: an empty or oversized batch, a stream that does not
    /// allow atomic publish, a malformed answer.
    #[error("atomic batch failed: {0}")]
    Other(String),
}

impl AtomicError {
    fn from_nats<E: std::error::Error + 'static>(e: E) -> Self {
        match fault::classify(&e) {
            Fault::Conflict => Self::Conflict(e.to_string()),
            Fault::Unavailable => Self::Unavailable(e.to_string()),
            Fault::Other => Self::Other(e.to_string()),
        }
    }
}

impl Nats {
    /// Lets `stream` take atomic batches (`allow_atomic`), if it does not
    /// yet: a server that ignores the setting (older than 2.12) is a clear
    /// error, not a batch that later fails.
    pub async fn allow_atomic_publish(&self, stream: &str) -> Result<(), Error> {
        let mut s = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| nats_err(&format!("cannot look up stream {stream}"), e))?;
        let info = s
            .info()
            .await
            .map_err(|e| nats_err(&format!("cannot read stream {stream}"), e))?;
        if info.config.allow_atomic_publish {
            return Ok(());
        }
        let mut config = info.config.clone();
        config.allow_atomic_publish = true;
        let updated = self
            .js
            .update_stream(config)
            .await
            .map_err(|e| nats_err(&format!("cannot update stream {stream}"), e))?;
        if updated.config.allow_atomic_publish {
            Ok(())
        } else {
            Err(Error::BadConfig(format!(
                "stream {stream}: nats-server {} does not support atomic batch publish (2.12 or later does)",
                self.client.server_info().version
            )))
        }
    }

    /// Publishes `writes` as one atomic batch to the stream their subjects
    /// belong to (which must allow atomic publish).
    pub async fn publish_atomic(&self, writes: &[AtomicWrite]) -> Result<AtomicAck, AtomicError> {
        use async_nats::header::{
            NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE,
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        };
        let Some((last, rest)) = writes.split_last() else {
            return Err(AtomicError::Other("an atomic batch needs at least one message".into()));
        };
        if writes.len() > MAX_BATCH {
            return Err(AtomicError::Other(format!(
                "{} messages exceed the {MAX_BATCH} an atomic batch may hold",
                writes.len()
            )));
        }
        let id = uuid::Uuid::now_v7().simple().to_string();
        let headers = |i: usize, w: &AtomicWrite| {
            let mut h = async_nats::HeaderMap::new();
            h.insert(NATS_BATCH_ID, id.as_str());
            h.insert(NATS_BATCH_SEQUENCE, (i + 1).to_string().as_str());
            if let Some(seq) = w.expect_last {
                h.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, seq.to_string().as_str());
            }
            h
        };
        for (i, w) in rest.iter().enumerate() {
            self.client
                .publish_with_headers(w.subject.clone(), headers(i, w), w.payload.clone())
                .await
                .map_err(AtomicError::from_nats)?;
        }
        let mut h = headers(rest.len(), last);
        h.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
        let ack = self
            .js
            .publish_with_headers(last.subject.clone(), h, last.payload.clone())
            .await
            .map_err(AtomicError::from_nats)?;
        let ack = super::unless_reconnected(&self.client, ack)
            .await
            .ok_or_else(|| AtomicError::Unavailable("the connection broke before the batch was confirmed".into()))?
            .map_err(AtomicError::from_nats)?;
        let n = writes.len() as u64;
        Ok(AtomicAck {
            first: ack.sequence.saturating_sub(n - 1),
            last: ack.sequence,
        })
    }
}
