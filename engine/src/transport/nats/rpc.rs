//! Requests, answers and announcements on core NATS (no stream): the
//! [`Rpc`] seam of the NATS transport.
//!
//! A server is a queue subscription per subject, all in one queue group, so
//! every request reaches one process of those serving it. An answer is
//! published to the request's reply subject with the core client.

use std::time::Duration;

use async_nats::RequestErrorKind;
use bytes::Bytes;
use futures::stream::SelectAll;
use futures::StreamExt;

use super::{from_nats_headers, nats_err, to_nats_headers, Nats};
use crate::transport::{Error, Headers, Request, Requests, Rpc};

impl Rpc for Nats {
    type Requests = NatsRequests;

    async fn serve(&self, subjects: &[String], group: &str) -> Result<NatsRequests, Error> {
        if subjects.is_empty() {
            return Err(Error::BadConfig("serve needs at least one subject".into()));
        }
        let mut merged = SelectAll::new();
        for s in subjects {
            let sub = self
                .client
                .queue_subscribe(s.clone(), group.to_owned())
                .await
                .map_err(|e| nats_err(&format!("cannot serve `{s}` in group `{group}`"), e))?;
            merged.push(sub);
        }
        Ok(NatsRequests {
            subscriptions: merged,
            client: self.client.clone(),
        })
    }

    async fn request(
        &self,
        subject: String,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        let mut req = async_nats::Request::new().payload(payload).timeout(Some(timeout));
        if !headers.is_empty() {
            req = req.headers(to_nats_headers(&headers));
        }
        // A request in flight when the connection broke is most likely
        // lost with it: give up on it once connected again, rather than
        // wait out its time-out, so that its caller asks again at once.
        let Some(answer) = super::unless_reconnected(&self.client, self.client.send_request(subject.clone(), req)).await
        else {
            return Err(Error::Unavailable(format!(
                "request on `{subject}`: the connection broke before it was answered"
            )));
        };
        match answer {
            Ok(m) => Ok(m.payload),
            Err(e) => Err(match e.kind() {
                RequestErrorKind::NoResponders => Error::NoResponders(subject),
                RequestErrorKind::TimedOut => Error::TimedOut(format!("no answer on `{subject}` within {timeout:?}")),
                _ => nats_err(&format!("request on `{subject}`"), e),
            }),
        }
    }

    async fn announce(&self, subject: String, payload: Bytes) -> Result<(), Error> {
        self.client
            .publish(subject.clone(), payload)
            .await
            .map_err(|e| nats_err(&format!("cannot announce on `{subject}`"), e))
    }
}

/// The requests sent to the subjects one [`Nats::serve`] call serves.
pub struct NatsRequests {
    subscriptions: SelectAll<async_nats::Subscriber>,
    client: async_nats::Client,
}

impl std::fmt::Debug for NatsRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsRequests")
            .field("subscriptions", &self.subscriptions.len())
            .finish()
    }
}

impl Requests for NatsRequests {
    type Request = NatsRequest;

    async fn next(&mut self) -> Option<NatsRequest> {
        let m = self.subscriptions.next().await?;
        Some(NatsRequest {
            subject: m.subject.to_string(),
            headers: from_nats_headers(m.headers.as_ref()),
            payload: m.payload,
            reply: m.reply,
            client: self.client.clone(),
        })
    }
}

/// One request (or announcement) received on core NATS.
#[derive(Debug)]
pub struct NatsRequest {
    subject: String,
    headers: Headers,
    payload: Bytes,
    reply: Option<async_nats::Subject>,
    client: async_nats::Client,
}

impl Request for NatsRequest {
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
        let Some(reply) = self.reply else {
            // Sent with a plain publish (an announcement): nobody waits.
            tracing::warn!(subject = %self.subject, "a message without a reply subject was answered; the answer is dropped");
            return Ok(());
        };
        self.client
            .publish(reply, answer)
            .await
            .map_err(|e| nats_err(&format!("cannot answer a request on `{}`", self.subject), e))
    }
}
