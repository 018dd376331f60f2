//! A durable pull consumer of `WAYBILL_HOPS`, and its deliveries.

use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::AckKind;
use futures::StreamExt;

use super::{from_nats_headers, nats_err, other};
use crate::transport::{Consumer, Delivery, Error, Message};

/// One process's handle on a durable pull consumer.
pub struct NatsConsumer {
    pub(super) consumer: async_nats::jetstream::consumer::Consumer<pull::Config>,
    pub(super) messages: pull::Stream,
    pub(super) durable: String,
    /// Messages asked for at a time.
    pub(super) prefetch: usize,
    /// Dead-letters what exhausts its deliveries; stopped with the handle.
    pub(super) watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for NatsConsumer {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
    }
}

impl std::fmt::Debug for NatsConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConsumer").field("durable", &self.durable).finish()
    }
}

impl NatsConsumer {
    fn convert(m: async_nats::jetstream::Message) -> Result<NatsDelivery, Error> {
        let info = m
            .info()
            .map_err(|e| other("a message without JetStream metadata", e, false))?;
        let delivered = u32::try_from(info.delivered).unwrap_or(u32::MAX);
        let sequence = info.stream_sequence;
        let message = Message {
            subject: m.message.subject.to_string(),
            headers: from_nats_headers(m.message.headers.as_ref()),
            payload: m.message.payload.clone(),
        };
        Ok(NatsDelivery {
            inner: m,
            message,
            delivered,
            sequence,
        })
    }

    async fn restart(&mut self) -> Result<(), Error> {
        self.messages = pull_messages(&self.consumer, self.prefetch)
            .await
            .map_err(|e| nats_err(&format!("cannot pull from consumer {}", self.durable), e))?;
        Ok(())
    }
}

impl Consumer for NatsConsumer {
    type Delivery = NatsDelivery;

    async fn fetch(&mut self, max: usize) -> Result<Vec<NatsDelivery>, Error> {
        let max = max.max(1);
        let mut out = Vec::new();
        // Wait for the first message; then take what is already there.
        loop {
            match self.messages.next().await {
                Some(Ok(m)) => {
                    out.push(Self::convert(m)?);
                    break;
                }
                Some(Err(e)) => {
                    // Heartbeat misses, 409s and the like end a pull stream:
                    // start a new one and go on waiting.
                    tracing::debug!(consumer = %self.durable, error = %e, "pull stream error; restarting it");
                    self.restart().await?;
                }
                None => self.restart().await?,
            }
        }
        while out.len() < max {
            match futures::FutureExt::now_or_never(self.messages.next()) {
                Some(Some(Ok(m))) => out.push(Self::convert(m)?),
                _ => break,
            }
        }
        Ok(out)
    }
}

/// One delivery from a NATS consumer.
pub struct NatsDelivery {
    inner: async_nats::jetstream::Message,
    message: Message,
    delivered: u32,
    sequence: u64,
}

impl std::fmt::Debug for NatsDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsDelivery")
            .field("subject", &self.message.subject)
            .field("sequence", &self.sequence)
            .field("delivered", &self.delivered)
            .finish()
    }
}

/// A continuous pull of `batch` messages at a time with idle heartbeats.
/// Without them (async-nats's default), a pull request lost with its server
/// (a cluster node killed) goes unnoticed until it expires, 30 s later, and
/// the consumer gets nothing meanwhile: the fault suite saw a finished
/// order reach its client 30 s late. Two missed heartbeats end the stream,
/// and `fetch` starts a new one.
///
/// async-nats asks for more once half of a batch has been taken from the
/// stream, so at most `batch` messages wait in it untaken, their ack wait
/// running: whoever takes them keeps them alive (see the worker's pump).
pub(super) async fn pull_messages(
    consumer: &async_nats::jetstream::consumer::Consumer<pull::Config>,
    batch: usize,
) -> Result<pull::Stream, async_nats::jetstream::consumer::StreamError> {
    consumer
        .stream()
        .max_messages_per_batch(batch.max(1))
        .expires(Duration::from_secs(10))
        .heartbeat(Duration::from_secs(2))
        .messages()
        .await
}

fn ack_err(e: async_nats::Error) -> Error {
    match crate::transport::fault::classify(e.as_ref()) {
        crate::transport::fault::Fault::Unavailable => Error::Unavailable(format!("acknowledgement failed: {e}")),
        _ => other("acknowledgement failed", e, true),
    }
}

impl Delivery for NatsDelivery {
    fn message(&self) -> &Message {
        &self.message
    }

    fn delivered(&self) -> u32 {
        self.delivered
    }

    fn sequence(&self) -> u64 {
        self.sequence
    }

    async fn ack(self) -> Result<(), Error> {
        self.inner.ack().await.map_err(ack_err)
    }

    async fn nak(self, delay: Option<Duration>) -> Result<(), Error> {
        self.inner.ack_with(AckKind::Nak(delay)).await.map_err(ack_err)
    }

    async fn in_progress(&self) -> Result<(), Error> {
        self.inner.ack_with(AckKind::Progress).await.map_err(ack_err)
    }

    async fn term(self) -> Result<(), Error> {
        self.inner.ack_with(AckKind::Term).await.map_err(ack_err)
    }
}
