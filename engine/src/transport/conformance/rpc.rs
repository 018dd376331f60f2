//! Requests, answers and announcements ([`Rpc`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;

use super::{unique, PATIENCE};
use crate::transport::Headers;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::transport::{Error, Request, Requests, Rpc};

/// Subjects of the request checks: outside every stream, as the
/// coordinator's requests are.
const RPC_PREFIX: &str = "waybill.conformance.rpc_";

/// How long a request waits for its answer in the checks that expect one.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// A server that answers each request with `<name>|<subject>|<header
/// Waybill-Test>|<payload>`, counting what it received.
fn spawn_server<R: Requests>(mut requests: R, name: &'static str, received: Arc<AtomicUsize>) {
    tokio::spawn(async move {
        while let Some(r) = requests.next().await {
            received.fetch_add(1, Ordering::SeqCst);
            let answer = format!(
                "{name}|{}|{}|{}",
                r.subject(),
                r.headers().get("Waybill-Test").unwrap_or(""),
                String::from_utf8_lossy(r.payload())
            );
            r.respond(Bytes::from(answer)).await.unwrap();
        }
    });
}

async fn ask<T: Rpc>(t: &T, subject: &str, body: &str) -> Result<String, Error> {
    t.request(
        subject.to_owned(),
        Headers::new(),
        Bytes::from(body.to_owned()),
        ANSWER_WAIT,
    )
    .await
    .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A request is answered by the process serving its subject.
pub async fn request_is_answered<T: Rpc>(t: &T) {
    let subject = unique(RPC_PREFIX);
    let requests = t.serve(std::slice::from_ref(&subject), "g").await.unwrap();
    spawn_server(requests, "a", Arc::default());
    let answer = ask(t, &subject, "hello").await.unwrap();
    assert_eq!(answer, format!("a|{subject}||hello"));
}

/// A request nobody serves fails at once with `NoResponders`.
pub async fn nobody_serving_is_no_responders<T: Rpc>(t: &T) {
    let subject = unique(RPC_PREFIX);
    let began = tokio::time::Instant::now();
    let e = ask(t, &subject, "anyone?").await.unwrap_err();
    assert_eq!(e, Error::NoResponders(subject), "{e}");
    assert!(e.is_retryable() && e.is_unavailable());
    assert!(
        began.elapsed() < ANSWER_WAIT,
        "NoResponders should not wait for the time-out"
    );
}

/// A request its server receives and does not answer times out.
pub async fn unanswered_request_times_out<T: Rpc>(t: &T) {
    let subject = unique(RPC_PREFIX);
    let mut requests = t.serve(std::slice::from_ref(&subject), "g").await.unwrap();
    let wait = Duration::from_millis(300);
    let request = t.request(subject.clone(), Headers::new(), Bytes::from_static(b"x"), wait);
    // The request is held (not dropped) until the requester gave up.
    let (answer, held) = tokio::join!(request, tokio::time::timeout(PATIENCE, requests.next()));
    let held = held.unwrap().unwrap();
    assert_eq!(held.subject(), subject);
    assert!(matches!(answer, Err(Error::TimedOut(_))), "{answer:?}");
}

/// Servers sharing a group split the requests, each answered once; a
/// server of another group receives every one of them too.
pub async fn a_group_answers_each_request_once<T: Rpc>(t: &T) {
    let subject = unique(RPC_PREFIX);
    let (a, b, other) = (
        Arc::<AtomicUsize>::default(),
        Arc::<AtomicUsize>::default(),
        Arc::<AtomicUsize>::default(),
    );
    let subjects = std::slice::from_ref(&subject);
    spawn_server(t.serve(subjects, "shared").await.unwrap(), "a", a.clone());
    spawn_server(t.serve(subjects, "shared").await.unwrap(), "b", b.clone());
    // Another group, which only listens (its answers would race the
    // group's own, so it gives none).
    let mut listener = t.serve(subjects, "listeners").await.unwrap();
    let n = 20;
    for i in 0..n {
        let answer = ask(t, &subject, &i.to_string()).await.unwrap();
        assert!(answer.ends_with(&format!("|{i}")), "{answer}");
        let heard = tokio::time::timeout(PATIENCE, listener.next()).await.unwrap().unwrap();
        assert_eq!(heard.payload(), &Bytes::from(i.to_string()));
        other.fetch_add(1, Ordering::SeqCst);
    }
    let (a, b) = (a.load(Ordering::SeqCst), b.load(Ordering::SeqCst));
    assert_eq!(
        a + b,
        n,
        "each request should reach one server of the group (a {a}, b {b})"
    );
    assert!(
        a > 0 && b > 0,
        "both servers of the group should get requests (a {a}, b {b})"
    );
    assert_eq!(other.load(Ordering::SeqCst), n);
}

/// `*` matches one token, a last `>` one or more.
pub async fn wildcards_match_tokens<T: Rpc>(t: &T) {
    let root = unique(RPC_PREFIX);
    let subjects = [format!("{root}.*.status"), format!("{root}.deep.>")];
    spawn_server(t.serve(&subjects, "g").await.unwrap(), "w", Arc::default());
    for ok in [
        format!("{root}.x.status"),
        format!("{root}.deep.a"),
        format!("{root}.deep.a.b"),
    ] {
        let answer = ask(t, &ok, "").await.unwrap();
        assert_eq!(answer, format!("w|{ok}||"));
    }
    for none in [
        format!("{root}.x.y.status"),
        format!("{root}.deep"),
        format!("{root}.status"),
    ] {
        let e = ask(t, &none, "").await.unwrap_err();
        assert!(matches!(e, Error::NoResponders(_)), "{none}: {e}");
    }
}

/// The request's headers reach its server.
pub async fn request_headers_reach_the_server<T: Rpc>(t: &T) {
    let subject = unique(RPC_PREFIX);
    spawn_server(
        t.serve(std::slice::from_ref(&subject), "g").await.unwrap(),
        "h",
        Arc::default(),
    );
    let mut headers = Headers::new();
    headers.insert("Waybill-Test", "with a value");
    headers.insert(crate::headers::ORDER, "01890a5d-ac96-774b-bcce-b302099a8057");
    let answer = t
        .request(subject.clone(), headers, Bytes::from_static(b"p"), ANSWER_WAIT)
        .await
        .unwrap();
    assert_eq!(answer, Bytes::from(format!("h|{subject}|with a value|p")));
}

/// An announcement reaches whoever serves its subject, needs no answer
/// (answering it is harmless), and is no error when nobody listens.
pub async fn announcements_need_no_answer<T: Rpc>(t: &T) {
    let subject = unique(RPC_PREFIX);
    t.announce(subject.clone(), Bytes::from_static(b"into the void"))
        .await
        .unwrap();
    let mut requests = t.serve(std::slice::from_ref(&subject), "g").await.unwrap();
    t.announce(subject.clone(), Bytes::from_static(b"news")).await.unwrap();
    let heard = tokio::time::timeout(PATIENCE, requests.next()).await.unwrap().unwrap();
    assert_eq!(heard.subject(), subject);
    assert_eq!(heard.payload(), &Bytes::from_static(b"news"));
    heard.respond(Bytes::from_static(b"ignored")).await.unwrap();
}

/// Every request check, in turn.
pub async fn run_all_rpc<T: Rpc>(t: &T) {
    request_is_answered(t).await;
    nobody_serving_is_no_responders(t).await;
    unanswered_request_times_out(t).await;
    a_group_answers_each_request_once(t).await;
    wildcards_match_tokens(t).await;
    request_headers_reach_the_server(t).await;
    announcements_need_no_answer(t).await;
}
