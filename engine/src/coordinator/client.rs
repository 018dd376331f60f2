//! A typed client of the coordinator's request interface ([`super::api`]),
//! over any transport that carries requests ([`Rpc`]).

use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::api::{
    CancelReply, CancelRequest, ErrorReply, OrdersQuery, OrdersReply, SignalReply, StartReply, StatusReply,
};
use crate::id::{OrderId, SignalName};
use crate::subject;
use crate::transport::{self, Headers, Rpc};

/// Why a request to the coordinators got no answer of the kind asked for.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request did not get an answer: nobody serves it
    /// ([`transport::Error::NoResponders`]), no answer in time
    /// ([`transport::Error::TimedOut`]), or another transport failure.
    #[error(transparent)]
    Transport(#[from] transport::Error),
    /// The coordinator refused it for cause: the same request again will
    /// not succeed.
    #[error("{message}")]
    Refused {
        message: String,
        /// What kind of refusal, where the coordinator says.
        code: Option<super::api::ErrorCode>,
    },
    /// The coordinator could not do it for now (`"retryable": true`): send
    /// the same request again, a start under `id`.
    #[error("{message}")]
    Retry { message: String, id: Option<OrderId> },
    /// The answer is neither the reply asked for nor an error answer.
    #[error("unexpected answer on `{subject}`: {detail}")]
    BadAnswer {
        subject: String,
        /// The answer as text.
        detail: String,
        /// Why it is not the reply asked for, when it was read as one.
        #[source]
        cause: Option<serde_json::Error>,
    },
    /// The request could not be encoded.
    #[error("cannot encode the request on `{subject}`: {cause}")]
    Encode {
        subject: String,
        #[source]
        cause: serde_json::Error,
    },
}

impl RequestError {
    /// Whether the same request again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            RequestError::Transport(e) => e.is_retryable(),
            RequestError::Retry { .. } => true,
            RequestError::Refused { .. } | RequestError::BadAnswer { .. } | RequestError::Encode { .. } => false,
        }
    }
}

/// The coordinators' requests, typed. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CoordinatorClient<T: Rpc> {
    transport: T,
    timeout: Duration,
}

impl<T: Rpc> CoordinatorClient<T> {
    /// A client whose requests wait at most `timeout` for their answer.
    pub fn new(transport: T, timeout: Duration) -> Self {
        Self { transport, timeout }
    }

    /// How long a request waits for its answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The transport the requests go through.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Where one order stands (`waybill.status.<id>`).
    pub async fn status(&self, id: &OrderId) -> Result<StatusReply, RequestError> {
        self.ask(subject::status(id), Headers::new(), Bytes::new(), false).await
    }

    /// Cancels an order in flight (`waybill.cancel.<id>`), with `reason`
    /// (or the default one) kept in its history.
    pub async fn cancel(&self, id: &OrderId, reason: Option<&str>) -> Result<CancelReply, RequestError> {
        let subject = subject::cancel(id);
        let body = CancelRequest {
            reason: reason.map(str::to_owned),
        };
        let body = serde_json::to_vec(&body).map_err(|cause| RequestError::Encode {
            subject: subject.clone(),
            cause,
        })?;
        self.ask(subject, Headers::new(), Bytes::from(body), false).await
    }

    /// Delivers the signal `name` to an order (`waybill.signal.<id>.<name>`)
    /// with its JSON `data` (`{}` if empty); a second delivery of the same
    /// name answers `duplicate`.
    pub async fn signal(&self, id: &OrderId, name: &SignalName, data: &str) -> Result<SignalReply, RequestError> {
        let body = Bytes::copy_from_slice(data.as_bytes());
        self.ask(subject::signal(id, name), Headers::new(), body, false).await
    }

    /// A summary of the tracked orders (`waybill.orders`).
    pub async fn orders(&self, query: &OrdersQuery) -> Result<OrdersReply, RequestError> {
        let body = serde_json::to_vec(query).map_err(|cause| RequestError::Encode {
            subject: subject::ORDERS.to_owned(),
            cause,
        })?;
        self.ask(subject::ORDERS.to_owned(), Headers::new(), Bytes::from(body), false)
            .await
    }

    /// Starts one order of `workflow` (`waybill.start.<workflow>`), under
    /// `id` if given (the coordinator chooses one otherwise). A
    /// [`RequestError::Retry`] may have been stored after all: send it again
    /// under the id it names, which then answers `duplicate`.
    pub async fn start(
        &self,
        workflow: &str,
        id: Option<OrderId>,
        order_json: Bytes,
    ) -> Result<StartReply, RequestError> {
        let mut headers = Headers::with_capacity(1);
        if let Some(id) = id {
            headers.append(crate::headers::ORDER, id.to_string());
        }
        self.ask(subject::start(workflow), headers, order_json, true).await
    }

    /// Sends a request and reads its answer as `R`, or as an error answer.
    /// A start's answer that is neither is [`RequestError::BadAnswer`]
    /// without a cause (an error answer is looked for first).
    async fn ask<R: DeserializeOwned>(
        &self,
        subject: String,
        headers: Headers,
        body: Bytes,
        bare: bool,
    ) -> Result<R, RequestError> {
        let answer = self
            .transport
            .request(subject.clone(), headers, body, self.timeout)
            .await?;
        if let Ok(e) = serde_json::from_slice::<ErrorReply>(&answer) {
            return Err(if e.retryable == Some(true) {
                RequestError::Retry {
                    message: e.error,
                    id: e.id,
                }
            } else {
                RequestError::Refused {
                    message: e.error,
                    code: e.code,
                }
            });
        }
        serde_json::from_slice(&answer).map_err(|cause| RequestError::BadAnswer {
            subject,
            detail: String::from_utf8_lossy(&answer).into_owned(),
            cause: (!bare).then_some(cause),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::transport::{Embedded, Request, Requests};

    /// Serves `subject` once with `answer`, handing back what it received.
    async fn serve_once(
        t: &Embedded,
        subject: String,
        answer: &'static str,
    ) -> tokio::task::JoinHandle<(String, Headers, Bytes)> {
        let mut requests = t.serve(&[subject], subject::COORDINATOR_GROUP).await.unwrap();
        tokio::spawn(async move {
            let r = requests.next().await.unwrap();
            let got = (r.subject().to_owned(), r.headers().clone(), r.payload().clone());
            r.respond(Bytes::from_static(answer.as_bytes())).await.unwrap();
            got
        })
    }

    fn client(t: &Embedded) -> CoordinatorClient<Embedded> {
        CoordinatorClient::new(t.clone(), Duration::from_secs(1))
    }

    const ID: &str = "01890a5d-ac96-774b-bcce-b302099a8057";

    #[tokio::test(start_paused = true)]
    async fn a_start_carries_its_id_and_reads_the_reply() {
        let t = Embedded::new();
        let id: OrderId = ID.parse().unwrap();
        let server = serve_once(
            &t,
            subject::start("order"),
            r#"{"id":"01890a5d-ac96-774b-bcce-b302099a8057","workflow":"order","version":2}"#,
        )
        .await;
        let reply = client(&t)
            .start("order", Some(id), Bytes::from_static(b"{}"))
            .await
            .unwrap();
        assert_eq!((reply.id, reply.version, reply.duplicate), (id, 2, false));
        let (subject, headers, body) = server.await.unwrap();
        assert_eq!(subject, "waybill.start.order");
        assert_eq!(headers.get(crate::headers::ORDER), Some(ID));
        assert_eq!(body, Bytes::from_static(b"{}"));
    }

    #[tokio::test(start_paused = true)]
    async fn error_answers_are_refusals_or_retries() {
        let t = Embedded::new();
        let c = client(&t);
        let _s = serve_once(
            &t,
            subject::start("order"),
            r#"{"error":"no stream","retryable":true,"id":"01890a5d-ac96-774b-bcce-b302099a8057"}"#,
        )
        .await;
        let e = c.start("order", None, Bytes::new()).await.unwrap_err();
        assert!(
            matches!(&e, RequestError::Retry { message, id: Some(_) } if message == "no stream"),
            "{e:?}"
        );
        assert!(e.is_retryable());

        let _s = serve_once(
            &t,
            subject::start("order"),
            r#"{"error":"bad order","retryable":false}"#,
        )
        .await;
        let e = c.start("order", None, Bytes::new()).await.unwrap_err();
        assert!(
            matches!(&e, RequestError::Refused { message, .. } if message == "bad order"),
            "{e:?}"
        );
        assert!(!e.is_retryable());

        let id: OrderId = ID.parse().unwrap();
        let _s = serve_once(&t, subject::status(&id), r#"{"error":"unknown order"}"#).await;
        let e = c.status(&id).await.unwrap_err();
        assert!(
            matches!(&e, RequestError::Refused { message, .. } if message == "unknown order"),
            "{e:?}"
        );

        let _s = serve_once(&t, subject::ORDERS.to_owned(), "[1,2]").await;
        let e = c.orders(&OrdersQuery::default()).await.unwrap_err();
        assert!(
            matches!(&e, RequestError::BadAnswer { subject, detail, cause: Some(_) } if subject == "waybill.orders" && detail == "[1,2]"),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_coordinator_is_a_transport_error() {
        let t = Embedded::new();
        let id: OrderId = ID.parse().unwrap();
        let e = client(&t).status(&id).await.unwrap_err();
        assert!(
            matches!(&e, RequestError::Transport(transport::Error::NoResponders(s)) if *s == subject::status(&id)),
            "{e:?}"
        );
        assert!(e.is_retryable());
    }
}
