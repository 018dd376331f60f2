//! The dead letters kept in `WAYBILL_DLQ`: read, sent back to the step they
//! came from, or deleted. What `waybill dlq` runs on.

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use bytes::Bytes;
use futures::StreamExt;

use super::{from_nats_headers, nats_err, other, Nats, DLQ_STREAM};
use crate::document::Timestamp;
use crate::headers::{DLQ_CONSUMER, DLQ_KIND, DLQ_REASON, MSG_ID};
use crate::id::MsgId;
use crate::subject;
use crate::transport::{DeadLetterKind, Error, Headers, Outgoing, PublishAck, Transport};

/// One dead letter as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLetter {
    /// Its sequence in `WAYBILL_DLQ`: how commands name it.
    pub sequence: u64,
    pub stored_at: Timestamp,
    /// Where it is kept (`waybill.dlq.<service>`).
    pub subject: String,
    /// Why it is a dead letter; `None` if the header is missing or names a
    /// kind this build does not know (its text is in `kind_text`).
    pub kind: Option<DeadLetterKind>,
    pub kind_text: String,
    pub reason: String,
    /// The consumer that gave up on it.
    pub consumer: String,
    /// The headers it had as a hop, and the dead letter's own.
    pub headers: Headers,
    pub payload: Bytes,
}

impl StoredLetter {
    /// The hop subject it came from, where a redrive sends it back.
    pub fn origin(&self) -> Option<String> {
        subject::origin_of_dead_letter(&self.subject)
    }
}

impl Nats {
    pub(super) async fn dead_letter_stream(&self) -> Result<async_nats::jetstream::stream::Stream, Error> {
        self.js
            .get_stream(DLQ_STREAM)
            .await
            .map_err(|e| nats_err(&format!("stream {DLQ_STREAM} is missing"), e))
    }

    /// Every dead letter, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<StoredLetter>, Error> {
        let mut stream = self.dead_letter_stream().await?;
        let info = stream
            .info()
            .await
            .map_err(|e| nats_err(&format!("cannot read stream {DLQ_STREAM}"), e))?;
        let (count, last) = (info.state.messages, info.state.last_sequence);
        let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        if count == 0 {
            return Ok(out);
        }
        // An ordered consumer reads the stream once, without acks, and is
        // gone with this call.
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                filter_subject: subject::all_dead_letters(),
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err("cannot read the dead letters", e))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| nats_err("cannot read the dead letters", e))?;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| nats_err("reading the dead letters failed", e))?;
            let meta = m
                .info()
                .map_err(|e| other("a dead letter without metadata", e, false))?;
            let (sequence, pending) = (meta.stream_sequence, meta.pending);
            let stored_at = micros(meta.published.unix_timestamp_nanos());
            out.push(letter(
                sequence,
                stored_at,
                m.message.subject.to_string(),
                m.message.headers.as_ref(),
                m.message.payload.clone(),
            ));
            if pending == 0 || sequence >= last {
                break;
            }
        }
        Ok(out)
    }

    /// The dead letter stored at `sequence`, if it is there.
    pub async fn dead_letter_at(&self, sequence: u64) -> Result<Option<StoredLetter>, Error> {
        let stream = self.dead_letter_stream().await?;
        match stream.get_raw_message(sequence).await {
            Ok(m) => Ok(Some(letter(
                m.sequence,
                micros(m.time.unix_timestamp_nanos()),
                m.subject.to_string(),
                Some(&m.headers),
                m.payload,
            ))),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(nats_err(&format!("cannot read dead letter {sequence}"), e)),
        }
    }

    /// Sends a dead letter back to the step it came from, as it was (its
    /// history intact), then deletes it. The send carries an id of its own
    /// (`dlq:<sequence>:redrive`): a redrive repeated inside the duplicate
    /// window (its delete failed, say) is stored once.
    pub async fn redrive_dead_letter(&self, letter: &StoredLetter) -> Result<PublishAck, Error> {
        let origin = letter.origin().ok_or_else(|| {
            Error::BadConfig(format!(
                "dead letter {} was kept under `{}`, not a hop's dead-letter subject: it has no step to go back to",
                letter.sequence, letter.subject
            ))
        })?;
        let mut headers = Headers::with_capacity(letter.headers.len());
        for (name, value) in letter.headers.iter() {
            if ![DLQ_REASON, DLQ_KIND, DLQ_CONSUMER, MSG_ID].contains(&name) {
                headers.append(name.to_owned(), value);
            }
        }
        let ack = self
            .publish(Outgoing {
                subject: origin,
                msg_id: Some(MsgId::dead_letter_redrive(letter.sequence)),
                headers,
                payload: letter.payload.clone(),
                due: None,
            })
            .await?;
        self.delete_dead_letter(letter.sequence).await?;
        Ok(ack)
    }

    /// Deletes the dead letter at `sequence`; `false` if it was not there.
    pub async fn delete_dead_letter(&self, sequence: u64) -> Result<bool, Error> {
        let stream = self.dead_letter_stream().await?;
        match stream.delete_message(sequence).await {
            Ok(deleted) => Ok(deleted),
            Err(e) if is_no_message(&e) => Ok(false),
            Err(e) => Err(nats_err(&format!("cannot delete dead letter {sequence}"), e)),
        }
    }
}

/// A read of a sequence the stream does not hold (deleted, or never
/// stored).
fn is_gone(e: &async_nats::jetstream::stream::RawMessageError) -> bool {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    use async_nats::jetstream::ErrorCode;
    match e.kind() {
        RawMessageErrorKind::NoMessageFound => true,
        RawMessageErrorKind::JetStream(j) => {
            j.error_code() == ErrorCode::NO_MESSAGE_FOUND || j.error_code() == ErrorCode::SEQUENCE_NOT_FOUND
        }
        _ => false,
    }
}

/// A delete of a sequence the stream does not hold: JetStream's "no message
/// found" (code 10037) or "sequence not found" (10043).
fn is_no_message(e: &async_nats::jetstream::stream::DeleteMessageError) -> bool {
    use async_nats::jetstream::stream::DeleteMessageErrorKind;
    use async_nats::jetstream::ErrorCode;
    matches!(e.kind(), DeleteMessageErrorKind::JetStream(j)
        if j.error_code() == ErrorCode::SEQUENCE_NOT_FOUND || j.error_code() == ErrorCode::NO_MESSAGE_FOUND)
}

fn micros(nanos: i128) -> Timestamp {
    Timestamp(u64::try_from(nanos / 1000).unwrap_or(0))
}

fn letter(
    sequence: u64,
    stored_at: Timestamp,
    subject: String,
    headers: Option<&async_nats::HeaderMap>,
    payload: Bytes,
) -> StoredLetter {
    let headers = from_nats_headers(headers);
    let text = |name| headers.get(name).unwrap_or_default().to_owned();
    let kind_text = text(DLQ_KIND);
    StoredLetter {
        sequence,
        stored_at,
        subject,
        kind: kind_text.parse().ok(),
        reason: text(DLQ_REASON),
        consumer: text(DLQ_CONSUMER),
        kind_text,
        headers,
        payload,
    }
}
